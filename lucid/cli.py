"""The ``lucid`` command: serve, init, check, plugins."""

from __future__ import annotations

import os
import secrets
import sys
from importlib.resources import files
from pathlib import Path
from typing import Any

import click

from lucid import __version__
from lucid.config import ConfigError

CONFIG_HELP = "cluster config file (TOML); without it, the built-in defaults"


def _config_path(value: str | None) -> Path | None:
    return Path(value) if value else None


@click.group()
@click.version_option(__version__, prog_name="lucid")
def main() -> None:
    """Lucid: an API gateway whose capabilities are swappable plugins."""


@main.command()
@click.option("--config", "config", metavar="FILE", help=CONFIG_HELP)
def serve(config: str | None) -> None:
    """Run the proxy and admin listeners until SIGTERM (SIGHUP reloads the config)."""
    from lucid.server import serve_forever

    sys.exit(serve_forever(_config_path(config)))


@main.command()
@click.option("--config", "config", metavar="FILE", help=CONFIG_HELP)
def check(config: str | None) -> None:
    """Validate a config file and exit: 0 if usable, 2 if not."""
    from lucid.runtime import load_plugins_and_config

    try:
        plugin_set, cfg = load_plugins_and_config(_config_path(config))
        from lucid.plugins import Hooks

        reasons = Hooks(plugin_set.pm).check_workers(cfg, cfg.server.workers)
        if reasons:
            raise ConfigError(config or "(built-in defaults)",
                              [f"server.workers = {cfg.server.workers}: {r}" for r in reasons])
        from lucid.admin import is_loopback

        if cfg.server.admin_secret is None and not is_loopback(cfg.server.admin):
            raise ConfigError(config or "(built-in defaults)", [
                f"server.admin = {cfg.server.admin!r}: the admin API may listen beyond "
                "loopback only with authentication; set server.admin_secret"])
        checked = _prepare(plugin_set, cfg, _config_path(config))
    except ConfigError as exc:
        click.echo(exc.render(), err=True)
        sys.exit(2)
    enabled = ", ".join(f"{p.capability}={p.name}" for p in plugin_set.plugins) or "none"
    routes = len(getattr(getattr(cfg, "gateway", None), "routes", []))
    click.echo(f"{config or '(built-in defaults)'}: ok (plugins: {enabled}; routes: {routes})")
    if checked is not None:  # a Redis backend: live cluster, or only the snapshot
        click.echo(checked)


def _prepare(plugin_set: object, cfg: object, path: Path | None) -> str | None:
    """Run the plugins' prepare hooks too, so a check catches what startup would;
    with a Redis backend, what the definitions were checked against."""
    import asyncio

    from lucid.runtime import Runtime

    runtime = Runtime(plugin_set, cfg, path)  # type: ignore[arg-type]

    return asyncio.run(runtime.check())


@main.command()
@click.argument("directory", default=".", type=click.Path(file_okay=False))
@click.option("--force", is_flag=True, help="overwrite an existing cluster.toml")
def init(directory: str, force: bool) -> None:
    """Write a commented starter cluster.toml (with a fresh admin secret) into DIRECTORY."""
    target = Path(directory) / "cluster.toml"
    if target.exists() and not force:
        click.echo(f"lucid: {target} exists; use --force to overwrite it", err=True)
        sys.exit(1)
    template = files("lucid").joinpath("defaults/starter.toml").read_text()
    text = template.replace("@ADMIN_SECRET@", secrets.token_urlsafe(32))
    target.parent.mkdir(parents=True, exist_ok=True)
    write_private(target, text)
    click.echo(f"wrote {target}; run: lucid serve --config {target}")


def write_private(target: Path, text: str) -> None:
    """Write a file that may hold secrets: mode 0600 from its first byte (a temporary
    file beside it, ``mkstemp`` makes it 0600 whatever the umask), then renamed over
    ``target``, so an existing file is replaced whole, never rewritten in place with
    its old mode nor left half written. A target that exists but is not a regular
    file (``/dev/stdout``, a pipe) is written as it is: its mode is not ours."""
    import tempfile

    if target.exists() and not target.is_file():
        with target.open("w") as fh:
            fh.write(text)
        return
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@main.command("plugins")
@click.option("--config", "config", metavar="FILE", help="show what this config enables")
def plugins_command(config: str | None) -> None:
    """List installed plugins: capability, whether enabled, hooks implemented."""
    from lucid.config import plugin_choices, read_toml
    from lucid.plugins import choose_plugins, hook_names_of, installed_plugins

    path = _config_path(config)
    source = config or "(built-in defaults)"
    problem: ConfigError | None = None
    names: set[str] = set()
    try:
        data = read_toml(path) if path else {}
        names = {p.name for p in choose_plugins(plugin_choices(data, source), source)[0]}
    except ConfigError as exc:
        problem = exc  # still list what is installed: fixing the problem starts there
    rows = []
    for plugin in installed_plugins():
        try:
            capability, hooks = plugin.capability, ", ".join(hook_names_of(plugin.module))
        except Exception as exc:
            capability, hooks = "?", f"(failed to import: {exc})"
        rows.append((plugin.name, capability, "yes" if plugin.name in names else "no",
                     plugin.distribution, hooks))
    header = ("plugin", "capability", "enabled", "package", "hooks")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    for row in [header, *rows]:
        click.echo("  ".join(c.ljust(w) for c, w in zip(row[:4], widths, strict=True))
                   + "  " + row[4])
    if problem is not None:
        click.echo(problem.render(), err=True)
        sys.exit(2)
    if any(row[1] == "?" for row in rows):
        sys.exit(2)  # a broken package is worth a non-zero exit here, used or not


@main.command()
@click.option("--config", "config", metavar="FILE", help=CONFIG_HELP)
@click.option("--role", type=click.Choice(["viewer", "admin"]), default="viewer",
              show_default=True, help="viewer reads the admin API; admin also writes")
@click.option("--ttl", default="1h", show_default=True, help="lifetime: 30m, 1h, 7d ...")
@click.option("--subject", default=None, help="who the token names in the audit log "
              "(default: $USER)")
def token(config: str | None, role: str, ttl: str, subject: str | None) -> None:
    """Mint an admin API token signed with server.admin_secret."""
    from lucid.admin import mint_admin_token
    from lucid.config import read_toml, validate_config
    from lucid.units import parse_duration

    try:
        seconds = parse_duration(ttl)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--ttl") from None
    if not 0 < seconds <= 366 * 86400:
        raise click.BadParameter("between 1s and 366d", param_hint="--ttl")
    path = _config_path(config)
    try:
        data = read_toml(path) if path else {}
        root: Any = validate_config({"server": data.get("server", {})}, {},
                                    config or "(built-in defaults)")
        server = root.server
    except ConfigError as exc:
        click.echo(exc.render(), err=True)
        sys.exit(2)
    if server.admin_secret is None:
        click.echo("lucid: server.admin_secret is not set; the admin API has no tokens",
                   err=True)
        sys.exit(2)
    who = subject or os.environ.get("USER") or "operator"
    click.echo(mint_admin_token(server.admin_secret.get_secret_value(), role, seconds, who))


@main.group("config")
def config_group() -> None:
    """Work with the effective configuration."""


@config_group.command("export")
@click.option("--config", "config", metavar="FILE", help=CONFIG_HELP)
@click.option("--output", "-o", metavar="FILE",
              help="write here (mode 0600) instead of stdout")
@click.option("--show-secrets", is_flag=True,
              help="print secrets (server.admin_secret, issuer secrets ...) in clear, "
                   "for a backup or a migration; by default they read \"***\"")
def config_export(config: str | None, output: str | None, show_secrets: bool) -> None:
    """Print the effective config (file, environment overrides and the definitions
    added through the admin API, routes among them) as TOML, secrets redacted as GET
    /gateway/config shows them."""

    import tomli_w

    from lucid.config import data_dir, redact
    from lucid.definitions import read_stored
    from lucid.export import config_secrets, effective_config
    from lucid.runtime import load_plugins_and_config

    path = _config_path(config)
    try:
        plugin_set, cfg = load_plugins_and_config(path)
    except ConfigError as exc:
        click.echo(exc.render(), err=True)
        sys.exit(2)
    stored = read_stored(data_dir(cfg, path), plugin_set.kinds)
    data = effective_config(cfg, plugin_set.kinds, stored, full=False)
    if not show_secrets:
        data = redact(data, config_secrets(type(cfg), plugin_set.kinds, plugin_set.route_models))
    text = tomli_w.dumps(data)
    if output:
        try:
            write_private(Path(output), text)
        except OSError as exc:
            click.echo(f"lucid: cannot write {output}: {exc.strerror or exc}", err=True)
            sys.exit(1)
        click.echo(f"wrote {output}", err=True)
    else:
        click.echo(text, nl=False)


@main.group("cluster")
def cluster_group() -> None:
    """Look at the cluster this node belongs to ([cluster])."""


@cluster_group.command("status")
@click.option("--config", "config", metavar="FILE", help=CONFIG_HELP)
@click.option("--admin", "admin", metavar="HOST:PORT",
              help="the admin API to ask (default: server.admin of the config)")
def cluster_status(config: str | None, admin: str | None) -> None:
    """GET /cluster of a running node, as a table: every node, its addresses, the
    revision it serves, whether it is alive."""
    import json
    import time
    import urllib.error
    import urllib.request

    from lucid.admin import mint_admin_token
    from lucid.config import read_toml, validate_config

    path = _config_path(config)
    try:
        data = read_toml(path) if path else {}
        root: Any = validate_config({"server": data.get("server", {})}, {},
                                    config or "(built-in defaults)")
    except ConfigError as exc:
        click.echo(exc.render(), err=True)
        sys.exit(2)
    server = root.server
    base = (admin or server.admin).removeprefix("http://").rstrip("/")
    request = urllib.request.Request(f"http://{base}/cluster")
    if server.admin_secret is not None:
        token = mint_admin_token(server.admin_secret, "viewer", 60, "lucid cluster status")
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            view = json.load(answer)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        click.echo(f"lucid: cannot read http://{base}/cluster: {exc}", err=True)
        sys.exit(1)
    now = time.time()
    click.echo(f"backend: {view['backend']} {view.get('url', '')}  "
               f"up: {'yes' if view['backend_up'] else 'no'}  node: {view['node_id']}  "
               f"revision: {view['revision']}")
    rows = [(n["node_id"], n["proxy"], n["admin"], str(n["revision"]),
             "yes" if n["alive"] else "no", f"{max(0.0, now - n['last_seen']):.1f}s ago",
             str(n["workers"])) for n in view["nodes"]]
    header = ("node_id", "proxy", "admin", "revision", "alive", "last_seen", "workers")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


if __name__ == "__main__":
    main()
