"""Preflight for the host pyinfra is preparing, and what the deploy needs next.

pyinfra prepares every host of the inventory before it executes any
operation, and stops the whole run if preparing one host raises. Raising
here therefore leaves every host unchanged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from pyinfra import host, inventory, state

from . import flwr_cli, flwr_flags
from . import wheelhouse as wheelhouses
from .errors import DeployError, PreflightError
from .flwr_flags import FlwrFlags
from .host_facts import PythonPlatform, check_host
from .preflight import Federation, HostSpec, ResolvedHost, validate_inventory
from .security import prepare_tls
from .security_facts import check_security_facts, egress_addresses
from .settings import SUPERNODE
from .tls import TlsFiles
from .units import REMOTE_TLS, HostPaths, flags_cache_dir, host_paths

# pyinfra prints the records of its own logger in the deploy's output.
logger = logging.getLogger("pyinfra")


@dataclass(frozen=True)
class HostPlan:
    """Everything one host's deploy needs: its settings, wheelhouse and paths."""

    host: ResolvedHost
    wheelhouse: wheelhouses.Wheelhouse
    paths: HostPaths
    federation: Federation | None = None
    # None when the federation runs without TLS (melody_insecure).
    tls: TlsFiles | None = None
    # IP addresses a SuperNode may connect to: its SuperLink's. Empty otherwise.
    egress_addresses: tuple[str, ...] = ()
    # Flags of the pinned flwr, read from its own commands.
    flags: FlwrFlags | None = None

    @property
    def settings(self) -> dict:
        return self.host.settings

    @property
    def listen_port(self) -> int:
        """Return the SuperLink's own port: on loopback behind nginx, or public without TLS or on the gRPC family."""
        return flwr_cli.superlink_listen_port(self.settings, self.flags)

    @property
    def fleet_front(self) -> bool:
        """Whether nginx publishes the Fleet API: with TLS on flwr releases with one HTTP server."""
        return self.tls is not None and flwr_cli.superlink_family(self.flags.superlink) == flwr_cli.HTTP


def inventory_specs() -> list[HostSpec]:
    return [
        HostSpec(name=inventory_host.name, groups=tuple(inventory_host.groups), data=inventory_host.data.dict())
        for inventory_host in inventory
    ]


def prepare(role: str) -> HostPlan | None:
    """Validate the inventory and this host, build its wheelhouse.

    Return None when this host does not have `role`, so the deploy leaves it
    alone.
    """
    federation = validate_inventory(inventory_specs())
    tls_files = prepare_tls(federation)
    if tls_files is not None and state.config.DIFF:
        raise PreflightError([
            "pyinfra --diff would print the SuperLink's private key when it is uploaded; "
            "run the deploy without --diff"
        ])
    try:
        resolved = federation.host(host.name)
    except KeyError:
        return None
    if resolved.role != role:
        return None

    # The first active host of the role checks the facts of every active host
    # of the role (all of them unless pyinfra runs with --limit), so one run
    # reports the problems of all sites together. pyinfra stops the whole run
    # when this raises, whichever host it was raised for.
    active = {active_host.name for active_host in inventory.get_active_hosts()}
    peers = [
        peer for peer in [federation.superlink, *federation.supernodes]
        if peer.role == role and peer.name in active
    ]
    if resolved.name == peers[0].name:
        problems = []
        for peer in peers:
            problems += check_host(inventory.get_host(peer.name), role, peer.settings)
            problems += check_security_facts(inventory.get_host(peer.name), role, peer.settings)
        if problems:
            raise PreflightError(problems)

    if resolved.settings["melody_insecure"]:
        logger.warning(
            "WARNING host %s: melody_insecure is True, so the %s runs WITHOUT TLS, without SuperNode "
            "authentication, and anyone who reaches the SuperLink's port can submit runs; lab use "
            "only, never with patient data", host.name, role,
        )

    target = wheelhouses.target_from_fact(host.get_fact(PythonPlatform))
    cache_root = Path(resolved.settings["melody_wheelhouse_cache"]).resolve()
    try:
        built = wheelhouses.build(resolved.settings, target, cache_root)
    except wheelhouses.WheelhouseError as error:
        raise PreflightError([f"host {host.name}: {error}"]) from error

    flags = release_flags(resolved, built)
    egress = ()
    if role == SUPERNODE and tls_files is not None:
        egress = tuple(egress_addresses(host, resolved.settings))
    return HostPlan(resolved, built, host_paths(resolved.settings, built.wheelhouse_id),
                    federation, tls_files, egress, flags)


def release_flags(resolved: ResolvedHost, built: wheelhouses.Wheelhouse) -> FlwrFlags:
    """Read the flags of the pinned flwr from the wheelhouse, and check every requested option.

    Raises PreflightError, before any host changes, when a setting requests a
    flag that the release does not accept.
    """
    settings = resolved.settings
    version = settings["melody_flwr_version"]
    try:
        flags = flwr_flags.probe(version, flags_cache_dir(settings), wheelhouse=built.path)
        if resolved.role == SUPERNODE:
            options = flwr_cli.supernode_options(settings, flags, "NODE-CONFIG", "CA", "KEY")
            problems = flwr_cli.option_problems("flower-supernode", version, options, flags.supernode)
        else:
            options = flwr_cli.superlink_options(settings, flags, REMOTE_TLS)
            problems = flwr_cli.option_problems("flower-superlink", version, options, flags.superlink)
    except DeployError as error:
        raise PreflightError([f"host {resolved.name}: {error}"]) from error
    if problems:
        raise PreflightError([f"host {resolved.name}: {problem}" for problem in problems])
    return flags
