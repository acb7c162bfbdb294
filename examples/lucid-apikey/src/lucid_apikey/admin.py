"""``GET /apikey/clients``: who may call, and how often each did. Never a key."""

from __future__ import annotations

from typing import Any

from lucid.admin import runtime
from quart import Blueprint

blueprint = Blueprint("apikey", __name__, url_prefix="/apikey")


@blueprint.get("/clients")
async def clients() -> Any:
    from lucid_apikey import SECTION, Keyring

    keyring: Keyring = runtime().generation.state[SECTION]  # the live generation's
    config = keyring.config
    return {"header": config.header, "required": config.required, "active": keyring.active,
            "clients": keyring.clients(), "refused": keyring.tally.refused}
