"""Operations that remove what the deploys installed, for deploy/teardown.py.

By default the SuperLink's state database, its log folder and the
SuperNodes' state folders stay on the hosts, owned by the removed user's
numeric id, so runs and audit records survive and a later deploy picks them
up again. The systemd journal is never touched. `melody_teardown_purge`
deletes the state and log folders too. A site's data folder is never
touched, with or without purge.
"""

from __future__ import annotations

import logging

from pyinfra import host
from pyinfra.api import deploy
from pyinfra.operations import files, server, systemd

from .plan import inventory_specs
from .preflight import ResolvedHost, validate_inventory
from .settings import SUPERLINK
from .backup import BACKUP_SERVICE, BACKUP_TIMER
from .control_access import control_home
from .fleet_front import remove_fleet_front
from .upgrade import upgrade_dir
from .units import REMOTE_TLS_DIR, SUPERLINK_UNIT, SUPERNODE_UNIT, UNIT_DIR

logger = logging.getLogger("pyinfra")


def prepare_teardown() -> ResolvedHost | None:
    """Validate the inventory and return this host's settings, or None when it has no role.

    Teardown needs no host facts, wheelhouse or TLS, so only the inventory's
    settings are checked. They include that no site's data folder overlaps a
    state or install folder, which keeps a purge away from the data.
    """
    federation = validate_inventory(inventory_specs())
    try:
        return federation.host(host.name)
    except KeyError:
        return None


def kept_folders(resolved: ResolvedHost) -> list[str]:
    """Return the folders with state, logs or app bundles that teardown keeps unless purging."""
    settings = resolved.settings
    if resolved.role == SUPERLINK:
        return [settings["melody_superlink_state_dir"], settings["melody_superlink_log_dir"]]
    return [settings["melody_supernode_state_dir"]]


@deploy("Service removed")
def remove_service(unit: str) -> None:
    """Stop and disable the unit, then delete its file."""
    systemd.service(name=f"{unit} is stopped and disabled", service=unit, running=False, enabled=False)
    removed = files.file(name=f"{UNIT_DIR}/{unit} is absent", path=f"{UNIT_DIR}/{unit}", present=False)
    systemd.daemon_reload(name="systemd has forgotten the removed unit", _if=removed.did_change)
    # A unit that crashed stays listed as failed after its file is gone.
    server.shell(
        name=f"{unit} has no failed state left",
        commands=[f"systemctl reset-failed {unit} 2>/dev/null || true"],
        _if=removed.did_change,
    )


@deploy("Venvs and wheelhouses removed")
def remove_install(resolved: ResolvedHost) -> None:
    """Delete the venvs, uploaded wheelhouses and helper scripts, and the install folder once it is empty."""
    install_dir = resolved.settings["melody_install_dir"]
    # The upgrade folder contains the unit file saved for a rollback.
    for folder in (f"{install_dir}/venvs", f"{install_dir}/wheelhouses", f"{install_dir}/bin",
                   upgrade_dir(resolved.settings)):
        files.directory(name=f"{folder} is absent", path=folder, present=False)
    # Keeps the folder when the operator put anything else in it.
    server.shell(
        name=f"{install_dir} is absent unless it holds other files",
        commands=[f"if [ -d {install_dir} ]; then rmdir --ignore-fail-on-non-empty {install_dir}; fi"],
    )


@deploy("SuperLink extras removed")
def remove_superlink_extras(resolved: ResolvedHost) -> None:
    """Remove the backup timer, the nginx Fleet front, the researchers' tunnel user and the TLS files.

    The backups themselves stay in melody_superlink_backup_dir, like the
    state database they copy.
    """
    remove_service(BACKUP_TIMER)
    remove_service(BACKUP_SERVICE)
    remove_fleet_front()
    user = resolved.settings["melody_control_user"]
    server.user(name=f"tunnel user {user} is absent", user=user, present=False)
    server.group(name=f"group {user} is absent", group=user, present=False)
    files.directory(name=f"{control_home(resolved.settings)} is absent",
                    path=control_home(resolved.settings), present=False)


@deploy("TLS files removed")
def remove_tls_files() -> None:
    """Delete the CA certificate and, on the SuperLink, its certificate and key."""
    files.directory(name=f"{REMOTE_TLS_DIR} is absent", path=REMOTE_TLS_DIR, present=False)
    server.shell(
        name=f"{REMOTE_TLS_DIR.rsplit('/', 1)[0]} is absent unless it holds other files",
        commands=[f"rmdir --ignore-fail-on-non-empty {REMOTE_TLS_DIR.rsplit('/', 1)[0]} 2>/dev/null || true"],
    )


@deploy("Service user removed")
def remove_service_user(resolved: ResolvedHost) -> None:
    user = resolved.settings["melody_service_user"]
    server.user(name=f"system user {user} is absent", user=user, present=False)
    server.group(name=f"group {user} is absent", group=user, present=False)


@deploy("State and logs")
def keep_or_purge_state(resolved: ResolvedHost) -> None:
    """Delete the state and log folders when purging; otherwise record a no-op that lists them as kept."""
    folders = kept_folders(resolved)
    if not resolved.settings["melody_teardown_purge"]:
        host.noop(f"kept {', '.join(folders)} (melody_teardown_purge is False)")
        return
    logger.warning("host %s: melody_teardown_purge is True, deleting %s", host.name, ", ".join(folders))
    for folder in folders:
        files.directory(name=f"{folder} is absent (purged)", path=folder, present=False)


def unit_for(resolved: ResolvedHost) -> str:
    return SUPERLINK_UNIT if resolved.role == SUPERLINK else SUPERNODE_UNIT
