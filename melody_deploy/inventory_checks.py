"""Inventory checks across settings and hosts: ports, shared addresses, nested paths.

They complete the per-setting checks of preflight.py and report in the same
form: one line per problem naming the host, the setting, the value and the fix.
"""

from __future__ import annotations

from typing import Any

from .settings import BY_NAME

# The units run without capabilities, so they cannot bind privileged ports.
FIRST_UNPRIVILEGED_PORT = 1024

# Host data keys that belong to pyinfra or its connectors, not to this deploy.
PYINFRA_KEY_PREFIXES = ("_", "ssh_", "winrm_", "docker_", "local_", "chroot_")


def check_unprefixed_keys(name: str, data: dict[str, Any], problems: list[str]) -> None:
    """Report host data keys that are a setting without its `melody_` prefix, such as `data_dir`."""
    for key in data:
        if key.startswith(("melody_", *PYINFRA_KEY_PREFIXES)):
            continue
        if f"melody_{key}" in BY_NAME:
            problems.append(
                f"host {name}: unknown key '{key}'; did you mean 'melody_{key}'? "
                f"Every setting of this deploy starts with 'melody_'"
            )


def check_privileged_ports(name: str, settings: dict[str, Any], problems: list[str]) -> None:
    for key in ("melody_superlink_port", "melody_supernode_port"):
        port = settings.get(key)
        if isinstance(port, int) and 1 <= port < FIRST_UNPRIVILEGED_PORT:
            problems.append(
                f"host {name}: setting '{key}' = {port} is a privileged port, which the service "
                f"cannot bind without capabilities; use a port from {FIRST_UNPRIVILEGED_PORT} to 65535"
            )


def contains(outer: str, inner: str) -> bool:
    """Return whether path `inner` is `outer` or lies inside it."""
    return (inner.rstrip("/") + "/").startswith(outer.rstrip("/") + "/")


def check_nested_paths(name: str, settings: dict[str, Any], problems: list[str]) -> None:
    """Keep the site's data folder apart from every folder that the deploy owns or deletes.

    The deploy sets the owner of its state folders and deletes venvs under the
    install folder, so a data folder inside one of them, or containing one,
    would be changed.
    """
    data_dir = settings.get("melody_data_dir")
    if not isinstance(data_dir, str):
        return
    for key in ("melody_supernode_state_dir", "melody_install_dir"):
        folder = settings.get(key)
        if not isinstance(folder, str):
            continue
        if contains(folder, data_dir) or contains(data_dir, folder):
            problems.append(
                f"host {name}: setting 'melody_data_dir' = {data_dir!r} overlaps '{key}' = {folder!r}; "
                f"the deploy owns that folder, so keep the site's data in a folder outside it"
            )


def check_shared_addresses(hosts: list, problems: list[str]) -> None:
    """Reject two SuperNodes on one machine, and port clashes where a SuperLink shares one.

    `hosts` are resolved hosts with name, role, address and settings. Each
    host runs one unit per role, so a second SuperNode would replace the first.
    """
    by_address: dict[str, list] = {}
    for resolved in hosts:
        by_address.setdefault(resolved.address, []).append(resolved)

    for address, sharing in by_address.items():
        supernodes = [resolved for resolved in sharing if resolved.role == "supernode"]
        superlinks = [resolved for resolved in sharing if resolved.role == "superlink"]
        if len(supernodes) > 1:
            names = ", ".join(resolved.name for resolved in supernodes)
            problems.append(
                f"hosts {names}: all reach address {address!r} (ssh_hostname), but a machine runs "
                f"one SuperNode; give each SuperNode its own host or fix ssh_hostname"
            )
        for superlink in superlinks:
            port = superlink.settings.get("melody_superlink_port")
            for supernode in supernodes:
                if supernode.settings.get("melody_supernode_port") == port:
                    problems.append(
                        f"host {supernode.name}: setting 'melody_supernode_port' = {port} clashes with "
                        f"'melody_superlink_port' of host {superlink.name} on the same machine "
                        f"({address}); pick another port for one of them"
                    )


def check_operations_settings(name: str, settings: dict[str, Any], problems: list[str]) -> None:
    minimum = settings.get("melody_verify_min_free_mb")
    if isinstance(minimum, int) and minimum < 0:
        problems.append(
            f"host {name}: setting 'melody_verify_min_free_mb' = {minimum} must be 0 or more (MiB)"
        )


def check_host_extras(name: str, data: dict[str, Any], settings: dict[str, Any], problems: list[str]) -> None:
    """Run the checks of this module that look at one host."""
    check_unprefixed_keys(name, data, problems)
    check_privileged_ports(name, settings, problems)
    check_nested_paths(name, settings, problems)
    check_operations_settings(name, settings, problems)
