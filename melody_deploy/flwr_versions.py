"""Preflight checks of the pinned flwr release: its form, the audit launcher, lockstep.

Flower's SuperLink, SuperNodes and the researcher's CLI must share one
major.minor version, so a federation upgrades in lockstep. An operator who
must upgrade hosts one by one sets `melody_flwr_staged_upgrade` on every
host; the deploy then warns instead of stopping.
"""

from __future__ import annotations

import logging

from melody_audit.flwr_compat import CHECKED_FLWR_VERSIONS

from . import flwr_cli

logger = logging.getLogger("pyinfra")


def check_flwr_version(name: str, settings: dict, problems: list[str]) -> None:
    """Check `melody_flwr_version` of one host, and that its SuperNode's egress record supports it."""
    version = settings.get("melody_flwr_version")
    if version is None:
        return
    problem = flwr_cli.version_problem(version)
    if problem is not None:
        problems.append(f"host {name}: setting 'melody_flwr_version' = {problem}")
        return

    # The SuperNode runs under melody_audit's launcher, which wraps private
    # functions of flwr and was read against these releases only.
    # Only a SuperNode's settings contain its state folder.
    if "melody_supernode_state_dir" in settings and version not in CHECKED_FLWR_VERSIONS:
        problems.append(
            f"host {name}: setting 'melody_flwr_version' = {version!r} is not a release that the "
            f"SuperNode's egress record (melody_audit) was checked against; use one of "
            f"{', '.join(CHECKED_FLWR_VERSIONS)}"
        )


def minor_of(version: str) -> str | None:
    try:
        major, minor, _ = flwr_cli.parse_version(version)
    except ValueError:
        return None
    return f"{major}.{minor}"


def check_lockstep(hosts: list, problems: list[str]) -> None:
    """Refuse hosts that would end on different flwr major.minor versions, unless staged.

    `hosts` are resolved hosts (name, role, settings). A staged upgrade needs
    `melody_flwr_staged_upgrade` on every host, so that one forgotten host
    cannot turn the check off for the whole federation.
    """
    minors: dict[str, list[str]] = {}
    for host in hosts:
        minor = minor_of(host.settings.get("melody_flwr_version", ""))
        if minor is not None:
            minors.setdefault(minor, []).append(host.name)
    if len(minors) < 2:
        return

    groups = "; ".join(f"{minor} on {', '.join(names)}" for minor, names in sorted(minors.items()))
    staged = [host.name for host in hosts if host.settings.get("melody_flwr_staged_upgrade")]
    if len(staged) == len(hosts):
        logger.warning(
            "WARNING: staged flwr upgrade: the federation's hosts run different major.minor versions "
            "(%s); SuperNodes on another version than the SuperLink cannot train until they match",
            groups,
        )
        return

    hint = "set one version for every host"
    if staged:
        unstaged = ", ".join(host.name for host in hosts if host.name not in staged)
        hint += f", or set melody_flwr_staged_upgrade = True on the other hosts too ({unstaged})"
    else:
        hint += ", or set melody_flwr_staged_upgrade = True on every host to upgrade them one by one"
    problems.append(
        f"setting 'melody_flwr_version' differs across the federation ({groups}); Flower "
        f"components must share major.minor, so {hint}"
    )

