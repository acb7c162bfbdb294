"""The effective config: the file, environment overrides, and the definitions written
through the admin API, as one plain document.

``GET /gateway/config`` and ``lucid config export`` both show this, from whichever
plugins are enabled: a kind registered with a ``section`` (``"gateway.routes"``) has
its dynamic definitions placed there, beside the ones the file declares. A kind
without one stays out of the document (its definitions are in its plugin's own
endpoints). Secrets are in clear here (``SecretStr`` values too, so an export loads
back); callers redact with :func:`config_secrets`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel

from lucid.config import EVERY_ITEM, SecretTree, merge_secrets, reveal, secret_fields
from lucid.definitions import Kind, Snapshot, merged


def effective_config(config: Any, kinds: Mapping[str, Kind], definitions: Snapshot, *,
                     full: bool) -> dict[str, Any]:
    """``full``: every setting, defaults included, and each definition as its kind's
    model reads it (the API's view); otherwise only what differs from the defaults
    and each definition's body as written (a file to keep, ``lucid config export``).

    A dynamic definition whose id the file now declares is left out: the file wins."""
    shapes: dict[str, Any] = reveal(config, config.model_dump(mode="json", exclude_none=True))
    data = shapes if full else reveal(config, config.model_dump(
        mode="json", exclude_none=True, exclude_defaults=True))
    for kind in kinds.values():
        if kind.section is None:
            continue
        dynamic = [d for d in merged(kind.declared(config), definitions, kind.name).values()
                   if d.origin == "dynamic"]
        if not dynamic:
            continue
        place = _place(data, kind.section, shapes)
        for d in dynamic:
            body = (_clear(d.parsed(kind.model)) if full else dict(d.body))
            if isinstance(place, list):
                place.append({**body, "id": d.id})
            else:
                place[d.id] = body
    return data


def _clear(model: BaseModel) -> dict[str, Any]:
    dumped: dict[str, Any] = reveal(model, model.model_dump(mode="json", exclude_none=True))
    return dumped


def config_secrets(config_type: type[BaseModel], kinds: Mapping[str, Kind],
                   route_models: Mapping[str, type[BaseModel]]) -> SecretTree | None:
    """Where the effective config keeps secrets (``SecretStr`` fields), for
    :func:`lucid.config.redact`: the root model's, each kind's model's at its
    ``section`` (a third-party kind may be placed where the root model types a plain
    table), and each plugin's ``route_model`` in a route's overrides."""
    tree = secret_fields(config_type, route_models)
    for kind in kinds.values():
        found = secret_fields(kind.model, route_models)
        if kind.section is None or found is None:
            continue
        for key in reversed([*kind.section.split("."), EVERY_ITEM]):
            found = {key: found}
        tree = merge_secrets(tree, found)
    return tree


def _place(data: dict[str, Any], section: str,
           shapes: dict[str, Any]) -> list[Any] | dict[str, Any]:
    """The list (or table by id) at the dotted ``section``, made if missing (left out
    as a default): the same shape as in ``shapes``, the config with its defaults."""
    *parents, last = section.split(".")
    node, shape = data, shapes
    for key in parents:
        node = node.setdefault(key, {})
        shape = shape.get(key, {}) if isinstance(shape, dict) else {}
    empty: list[Any] | dict[str, Any] = (
        {} if isinstance(shape, dict) and isinstance(shape.get(last), dict) else [])
    found: list[Any] | dict[str, Any] = node.setdefault(last, empty)
    return found
