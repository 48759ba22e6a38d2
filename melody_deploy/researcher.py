"""Write a researcher's Flower connection to the SuperLink of an inventory.

    python -m melody_deploy.researcher inventories/lab.py --connection lab

adds or replaces `[superlink.lab]` in `$FLWR_HOME/config.toml` (default
`~/.flwr/config.toml`) and keeps every other entry. Then
`flwr run melody_app lab` submits the app to that SuperLink.
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys
import tomllib
from pathlib import Path

import tomli_w

from .errors import PreflightError
from .preflight import HostSpec, validate_inventory


def load_inventory(path: Path) -> list[HostSpec]:
    """Read a pyinfra Python inventory: each module-level list is a group of hosts."""
    namespace = runpy.run_path(str(path))
    groups: dict[str, list[str]] = {}
    data: dict[str, dict] = {}
    for group, members in namespace.items():
        if group.startswith("_") or not isinstance(members, list):
            continue
        for member in members:
            name, host_data = member if isinstance(member, tuple) else (member, {})
            if not isinstance(name, str):
                continue
            groups.setdefault(name, []).append(group)
            data.setdefault(name, {}).update(host_data)
    return [HostSpec(name, tuple(groups[name]), data[name]) for name in groups]


def flwr_config_path() -> Path:
    home = os.environ.get("FLWR_HOME")
    return Path(home) / "config.toml" if home else Path.home() / ".flwr" / "config.toml"


def connection_entry(specs: list[HostSpec], address: str | None) -> dict:
    federation = validate_inventory(specs)
    superlink = federation.superlink
    port = superlink.settings["melody_superlink_port"]
    entry = {"address": address or f"{superlink.address}:{port}"}
    if superlink.settings["melody_insecure"]:
        entry["insecure"] = True
    return entry


def write_connection(config_path: Path, name: str, entry: dict) -> None:
    config = {}
    if config_path.exists():
        with open(config_path, "rb") as handle:
            config = tomllib.load(handle)
    config.setdefault("superlink", {})[name] = entry

    config_path.parent.mkdir(parents=True, exist_ok=True)
    temporary = config_path.with_suffix(".toml.tmp")
    temporary.write_text(tomli_w.dumps(config))
    temporary.replace(config_path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("inventory", type=Path, help="pyinfra inventory file of the federation")
    parser.add_argument("--connection", default="lab", help="connection name for `flwr run APP NAME` (default: lab)")
    parser.add_argument(
        "--address",
        help="HOST:PORT the researcher's machine reaches the SuperLink at "
        "(default: the SuperLink's ssh_hostname, or its inventory name, and melody_superlink_port)",
    )
    args = parser.parse_args(argv)

    try:
        entry = connection_entry(load_inventory(args.inventory), args.address)
    except PreflightError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    config_path = flwr_config_path()
    write_connection(config_path, args.connection, entry)
    print(f"wrote [superlink.{args.connection}] address = {entry['address']} to {config_path}")
    if entry.get("insecure"):
        print("warning: this connection has TLS off (insecure = true); lab use only", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
