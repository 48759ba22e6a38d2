"""Power lab hosts off and on again, keeping their disks: `python -m melody_lab reboot|stop|start`.

A guest's own `reboot` ends its systemd-nspawn on this machine, because no
systemd here restarts it. These functions do what a power cycle does to a
real server: the guest shuts down cleanly, its overlay (its disk) stays
mounted with everything deployed on it, and a new nspawn boots the same tree.
"""

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from melody_lab import nspawn, overlay, settings, ssh
from melody_lab.lab import LabError, _locked, _paths, check_prerequisites
from melody_lab.state import HostState, LabState, read_state, save_state

log = logging.getLogger(__name__)


def selected_hosts(state: LabState, names: list[str] | None) -> list[HostState]:
    if not names:
        return list(state.hosts)
    known = {host.name for host in state.hosts}
    unknown = [name for name in names if name not in known]
    if unknown:
        raise LabError(f"no lab host named {', '.join(unknown)}; the lab has {', '.join(sorted(known))}")
    return [host for host in state.hosts if host.name in names]


def _load() -> tuple[LabState, dict[str, Path]]:
    check_prerequisites()
    paths = _paths(settings.state_dir())
    state = read_state(paths["state"])
    if state is None:
        raise LabError("no lab is up; start one with `python -m melody_lab up`")
    return state, paths


def _power_off(host: HostState) -> None:
    nspawn.stop(host.pid, host.name)
    nspawn.remove_propagate_dir(host.name)
    host.pid = None


def _power_on(host: HostState, state: LabState, paths: dict[str, Path]) -> None:
    dirs = overlay.HostDirs(paths["hosts"] / host.name)
    if not overlay.is_mounted(dirs.merged):
        raise LabError(f"{host.name}: its overlay {dirs.merged} is not mounted; recreate the lab with down and up")
    host.pid = nspawn.launch(host.name, dirs.merged, state.bridge, paths["logs"] / f"{host.name}.log")


def stop(names: list[str] | None = None) -> LabState:
    """Power off the named hosts (all when `names` is empty); their disks stay."""
    state, paths = _load()
    with _locked(settings.state_dir()):
        hosts = selected_hosts(state, names)
        with ThreadPoolExecutor(max_workers=len(hosts)) as pool:
            list(pool.map(_power_off, hosts))
        save_state(state, paths["state"])
    log.info("stop: powered off %s", ", ".join(host.name for host in hosts))
    return state


def start(names: list[str] | None = None, boot_timeout: float = 120) -> LabState:
    """Boot the named hosts that are off (all when `names` is empty) and wait until they run."""
    state, paths = _load()
    started = time.monotonic()
    with _locked(settings.state_dir()):
        hosts = [host for host in selected_hosts(state, names) if not nspawn.is_running(host.pid, host.name)]
        for host in hosts:
            _power_on(host, state, paths)
        save_state(state, paths["state"])
        _wait_running(state, hosts, boot_timeout)
    log.info("start: %d hosts running after %.1f s", len(hosts), time.monotonic() - started)
    return state


def reboot(names: list[str] | None = None, boot_timeout: float = 120) -> LabState:
    """Power-cycle the named hosts (all when `names` is empty), keeping their disks."""
    started = time.monotonic()
    stop(names)
    state = start(names, boot_timeout)
    log.info("reboot: done in %.1f s", time.monotonic() - started)
    return state


def _wait_running(state: LabState, hosts: list[HostState], boot_timeout: float) -> None:
    if not hosts:
        return
    with ThreadPoolExecutor(max_workers=len(hosts)) as pool:
        waits = {host.name: pool.submit(ssh.wait_until_running, host.name, host.address,
                                        Path(state.ssh_key), Path(state.known_hosts), boot_timeout)
                 for host in hosts}
    errors = []
    for name, wait in waits.items():
        try:
            wait.result()
        except ssh.HostNotReadyError as error:
            log.error("%s", error)
            errors.append(str(error))
    if errors:
        raise LabError("lab hosts failed to boot again:\n" + "\n".join(errors))
