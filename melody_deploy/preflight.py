"""Validate the whole inventory's settings before any host is changed.

Both deploys validate every host of the inventory, not only the hosts they
change, because a SuperNode's settings depend on the SuperLink's and a
federation must agree on one flwr release. All problems are reported at once.
"""

from __future__ import annotations

import copy
import difflib
import re
from dataclasses import dataclass, field
from typing import Any

from .errors import PreflightError
from .flwr_versions import check_flwr_version, check_lockstep
from .inventory_checks import check_host_extras, check_shared_addresses
from .security_settings import check_security_values
from .settings import BY_NAME, SUPERLINK, SUPERNODE, Setting, format_type, settings_for_role

# pyinfra inventory groups that give a host its role.
SUPERLINK_GROUP = "superlink"
SUPERNODE_GROUP = "supernodes"

# Paths and values end up on a systemd command line and in Flower's
# `--node-config`, which splits on spaces: keep them to a safe character set.
SAFE_PATH = re.compile(r"^/[A-Za-z0-9._/+-]*$")
SAFE_NODE_CONFIG_VALUE = re.compile(r"^[A-Za-z0-9._/+:@-]*$")
NODE_CONFIG_KEY = re.compile(r"^[a-z][a-z0-9-]*$")
USER_NAME = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
TORCH_VERSION = re.compile(r"^\d+\.\d+\.\d+$")
# The backup timer's schedule goes into a unit file: one line, no `%` specifiers.
BACKUP_CALENDAR = re.compile(r"^[A-Za-z0-9*:,/.~ -]+$")

# Node config keys that the deploy sets itself from other settings.
RESERVED_NODE_CONFIG_KEYS = ("partition-id", "num-partitions", "data-dir")

PATH_SETTINGS = (
    "melody_install_dir",
    "melody_superlink_state_dir",
    "melody_superlink_log_dir",
    "melody_supernode_state_dir",
    "melody_data_dir",
    "melody_superlink_backup_dir",
    "melody_superlink_storage_dir",
)
PORT_SETTINGS = ("melody_superlink_port", "melody_supernode_port", "melody_superlink_internal_port",
                 "melody_superlink_serverappio_port")


@dataclass
class HostSpec:
    """An inventory host as validated: name, groups and host data."""

    name: str
    groups: tuple[str, ...]
    data: dict[str, Any]

    @property
    def address(self) -> str:
        """Address the operator's machine uses for this host."""
        return str(self.data.get("ssh_hostname") or self.name)


@dataclass
class ResolvedHost:
    """A host with its role and every setting it reads, defaults applied."""

    name: str
    role: str
    address: str
    settings: dict[str, Any]


@dataclass
class Federation:
    """The validated inventory: one SuperLink and its SuperNodes."""

    superlink: ResolvedHost
    supernodes: list[ResolvedHost] = field(default_factory=list)

    def host(self, name: str) -> ResolvedHost:
        for resolved in [self.superlink, *self.supernodes]:
            if resolved.name == name:
                return resolved
        raise KeyError(name)


def host_role(spec: HostSpec, problems: list[str]) -> str | None:
    in_superlink = SUPERLINK_GROUP in spec.groups
    in_supernodes = SUPERNODE_GROUP in spec.groups
    if in_superlink and in_supernodes:
        problems.append(
            f"host {spec.name}: is in both the '{SUPERLINK_GROUP}' and '{SUPERNODE_GROUP}' "
            f"groups; put each host in exactly one of them"
        )
        return None
    if in_superlink:
        return SUPERLINK
    if in_supernodes:
        return SUPERNODE
    return None


def has_type(value: Any, setting: Setting) -> bool:
    # bool is a subclass of int, so True must not pass as a port number.
    if isinstance(value, bool) and setting.kind is not bool:
        return False
    return isinstance(value, setting.kind)


def check_unknown_keys(spec: HostSpec, problems: list[str]) -> None:
    for key in spec.data:
        if not key.startswith("melody_") or key in BY_NAME:
            continue
        close = difflib.get_close_matches(key, BY_NAME, n=1)
        hint = f"did you mean '{close[0]}'?" if close else "see the settings table in the README"
        problems.append(f"host {spec.name}: unknown setting '{key}'; {hint}")


def resolve_settings(spec: HostSpec, role: str, problems: list[str]) -> dict[str, Any]:
    """Apply defaults and check each setting's type and choices.

    An invalid value is recorded as a problem and replaced by the default, so
    the checks across hosts can still run and report their own problems.
    """
    resolved: dict[str, Any] = {}
    for setting in settings_for_role(role):
        if not setting.required:
            resolved[setting.name] = copy.deepcopy(setting.default)
        if setting.name not in spec.data:
            if setting.required:
                problems.append(
                    f"host {spec.name}: setting '{setting.name}' is missing; "
                    f"set it in the inventory ({setting.help})"
                )
            continue

        value = spec.data[setting.name]
        if not has_type(value, setting):
            sample = f", such as {setting.sample!r}" if setting.sample is not None else ""
            problems.append(
                f"host {spec.name}: setting '{setting.name}' = {value!r} is a "
                f"{type(value).__name__}; it must be of type {format_type(setting)}{sample}"
            )
            continue
        if setting.choices and value not in setting.choices:
            choices = ", ".join(repr(choice) for choice in setting.choices)
            problems.append(
                f"host {spec.name}: setting '{setting.name}' = {value!r} is not one of {choices}"
            )
            continue
        resolved[setting.name] = value
    return resolved


def check_values(name: str, settings: dict[str, Any], problems: list[str]) -> None:
    """Check the values that have the right type but may still be invalid."""
    check_flwr_version(name, settings, problems)

    torch_version = settings.get("melody_torch_version")
    if torch_version is not None and not TORCH_VERSION.match(torch_version):
        problems.append(
            f"host {name}: setting 'melody_torch_version' = {torch_version!r} is not a release "
            f"version of the form X.Y.Z, such as '2.13.0'"
        )

    for key in PATH_SETTINGS:
        path = settings.get(key)
        if path is not None and (not SAFE_PATH.match(path) or "/../" in path + "/"):
            problems.append(
                f"host {name}: setting '{key}' = {path!r} must be an absolute path of letters, "
                f"digits and . _ / + - only, without '..', such as {BY_NAME[key].sample!r}"
            )

    for key in PORT_SETTINGS:
        port = settings.get(key)
        if port is not None and not 1 <= port <= 65535:
            problems.append(f"host {name}: setting '{key}' = {port} must be a port from 1 to 65535")

    for key in ("melody_service_user", "melody_control_user"):
        user = settings.get(key)
        if user is not None and not USER_NAME.match(user):
            problems.append(
                f"host {name}: setting '{key}' = {user!r} is not a valid system user "
                f"name; use lower-case letters, digits, '_' and '-', starting with a letter"
            )

    for key in ("melody_log_rotation_hours", "melody_log_backup_count", "melody_superlink_backup_count",
                "melody_venv_retire_after"):
        count = settings.get(key)
        if count is not None and count < 1:
            problems.append(f"host {name}: setting '{key}' = {count} must be 1 or more")

    calendar = settings.get("melody_superlink_backup_calendar")
    if calendar is not None and not BACKUP_CALENDAR.match(calendar):
        problems.append(
            f"host {name}: setting 'melody_superlink_backup_calendar' = {calendar!r} is not a "
            f"systemd OnCalendar= expression of letters, digits, spaces and * - : , / . ~; "
            f"use for example 'daily' or '*-*-* 02:00:00'"
        )

    for arg in settings.get("melody_pip_download_args", ()):
        if not isinstance(arg, str):
            problems.append(
                f"host {name}: setting 'melody_pip_download_args' holds {arg!r}; "
                f"give each argument as a string"
            )

    partition_id = settings.get("melody_partition_id")
    if partition_id is not None and partition_id < 0:
        problems.append(
            f"host {name}: setting 'melody_partition_id' = {partition_id} must be 0 or more"
        )

    check_node_config(name, settings.get("melody_node_config", {}), problems)
    check_security_values(name, settings, problems)


def check_node_config(name: str, node_config: dict[str, Any], problems: list[str]) -> None:
    for key, value in node_config.items():
        if not isinstance(key, str) or not NODE_CONFIG_KEY.match(key):
            problems.append(
                f"host {name}: 'melody_node_config' key {key!r} must be kebab-case, "
                f"such as 'image-size'"
            )
            continue
        if key in RESERVED_NODE_CONFIG_KEYS:
            problems.append(
                f"host {name}: 'melody_node_config' key {key!r} is set by the deploy; "
                f"use the settings melody_partition_id and melody_data_dir instead"
            )
            continue
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            problems.append(
                f"host {name}: 'melody_node_config' value {key}={value!r} must be a string, "
                f"an integer or a float"
            )
            continue
        if isinstance(value, str) and not SAFE_NODE_CONFIG_VALUE.match(value):
            problems.append(
                f"host {name}: 'melody_node_config' value {key}={value!r} may hold only "
                f"letters, digits and . _ / + : @ -"
            )


def parse_host_port(address: str) -> tuple[str, int] | None:
    host, separator, port = address.rpartition(":")
    if not separator or not host or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def check_superlink_address(
    supernode: ResolvedHost, superlink: ResolvedHost, superlink_names: set[str], problems: list[str]
) -> None:
    """Default a SuperNode's SuperLink address, or check that it names the inventory's SuperLink."""
    port = superlink.settings["melody_superlink_port"]
    address = supernode.settings.get("melody_superlink_address")
    if address is None:
        supernode.settings["melody_superlink_address"] = f"{superlink.name}:{port}"
        return

    parsed = parse_host_port(address)
    if parsed is None:
        problems.append(
            f"host {supernode.name}: setting 'melody_superlink_address' = {address!r} is not "
            f"HOST:PORT; use for example '{superlink.name}:{port}'"
        )
        return
    host, address_port = parsed
    if host not in superlink_names:
        known = ", ".join(sorted(superlink_names))
        problems.append(
            f"host {supernode.name}: setting 'melody_superlink_address' = {address!r} names "
            f"'{host}', which is not the inventory's SuperLink ({known}); point it at the "
            f"SuperLink host or add that host to the '{SUPERLINK_GROUP}' group"
        )
    elif address_port != port:
        problems.append(
            f"host {supernode.name}: setting 'melody_superlink_address' = {address!r} uses port "
            f"{address_port}, but the SuperLink listens on melody_superlink_port = {port}"
        )


def check_federation(federation: Federation, problems: list[str]) -> None:
    """Checks across hosts: unique partition ids, one flwr minor, SuperLink addresses."""
    superlink = federation.superlink
    superlink_names = {superlink.name, superlink.address}
    if superlink.settings.get("melody_superlink_listen_host") not in ("0.0.0.0", "::"):
        superlink_names.add(superlink.settings["melody_superlink_listen_host"])

    seen_ids: dict[int, str] = {}
    for supernode in federation.supernodes:
        partition_id = supernode.settings.get("melody_partition_id")
        if isinstance(partition_id, int) and partition_id in seen_ids:
            problems.append(
                f"host {supernode.name}: setting 'melody_partition_id' = {partition_id} is also "
                f"used by host {seen_ids[partition_id]}; give each SuperNode its own id"
            )
        elif isinstance(partition_id, int):
            seen_ids[partition_id] = supernode.name
        check_superlink_address(supernode, superlink, superlink_names, problems)

    check_lockstep([superlink, *federation.supernodes], problems)


def validate_inventory(specs: list[HostSpec]) -> Federation:
    """Validate every host's settings; raise PreflightError listing every problem."""
    problems: list[str] = []
    superlinks: list[ResolvedHost] = []
    supernodes: list[ResolvedHost] = []

    for spec in specs:
        check_unknown_keys(spec, problems)
        role = host_role(spec, problems)
        if role is None:
            continue
        settings = resolve_settings(spec, role, problems)
        check_values(spec.name, settings, problems)
        check_host_extras(spec.name, spec.data, settings, problems)
        resolved = ResolvedHost(spec.name, role, spec.address, settings)
        (superlinks if role == SUPERLINK else supernodes).append(resolved)

    if len(superlinks) != 1:
        names = ", ".join(host.name for host in superlinks) or "none"
        problems.append(
            f"the inventory must have exactly one host in the '{SUPERLINK_GROUP}' group, "
            f"found {len(superlinks)} ({names})"
        )
        raise PreflightError(problems)

    federation = Federation(superlinks[0], supernodes)
    for supernode in supernodes:
        supernode.settings["melody_num_partitions"] = len(supernodes)
    check_federation(federation, problems)
    check_shared_addresses([federation.superlink, *supernodes], problems)
    if problems:
        raise PreflightError(problems)
    return federation

