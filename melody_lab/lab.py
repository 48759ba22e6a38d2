"""Bring the lab up, check it, and tear it down: the API behind `python -m melody_lab`.

Typical use from Python:

    from melody_lab import lab
    state = lab.up(supernodes=2)   # no-op when such a lab is already up
    ...
    lab.down()                     # no-op when no lab is up
"""

import fcntl
import logging
import os
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from melody_lab import cgroups, data, guest, limits, network, nspawn, overlay, rootfs, settings, ssh
from melody_lab.plan import HostPlan, bridge_interface, parse_subnet, plan_hosts
from melody_lab.state import HostState, LabState, read_state, save_state

log = logging.getLogger(__name__)

REQUIRED_TOOLS = ("debootstrap", "systemd-nspawn", "ssh", "ssh-keygen", "ip", "mount", "umount", "tar")
STATE_FILE = "state.json"


class LabError(RuntimeError):
    """The lab cannot be brought up, checked or torn down, for the reason in the message."""


def _paths(state_dir: Path) -> dict[str, Path]:
    return {
        "state": state_dir / STATE_FILE,
        "rootfs": state_dir / "rootfs",
        "hosts": state_dir / "hosts",
        "logs": state_dir / "logs",
        "ssh": state_dir / "ssh",
        "lock": state_dir / "lock",
    }


def load_state() -> LabState | None:
    """Return the state of the lab in the state dir, or None when no lab state exists."""
    return read_state(_paths(settings.state_dir())["state"])


def check_prerequisites() -> None:
    """Raise LabError unless this process is root and the lab's tools are installed."""
    if os.geteuid() != 0:
        raise LabError("the lab needs root, because it creates a bridge, overlay mounts and cgroups; run it as root")
    missing = [tool for tool in REQUIRED_TOOLS if shutil.which(tool) is None]
    if missing:
        raise LabError(f"missing tools: {', '.join(missing)}; run scripts/setup.sh to install them")


@contextmanager
def _locked(state_dir: Path):
    """Hold the lab lock, so two `up` or `down` runs never interleave."""
    state_dir.mkdir(parents=True, exist_ok=True)
    with open(_paths(state_dir)["lock"], "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _same_shape(state: LabState, subnet: str, supernodes: int, dataset: Path) -> bool:
    return (state.subnet == subnet
            and len(state.supernodes) == supernodes
            and state.dataset == str(dataset))


def _system_state(state: LabState, host: HostState) -> str:
    """Return the output of `systemctl is-system-running` on the host, or why SSH failed."""
    try:
        result = ssh.run(Path(state.ssh_key), Path(state.known_hosts), host.address,
                         "systemctl is-system-running", timeout=30)
    except subprocess.TimeoutExpired:
        return "unreachable: SSH timed out after 30 s"
    return result.stdout.strip() or f"unreachable: {result.stderr.strip()}"


def _is_healthy(state: LabState) -> bool:
    """Return whether every host's nspawn runs and its systemd reports `running`."""
    for host in state.hosts:
        if not nspawn.is_running(host.pid, host.name):
            log.info("%s: systemd-nspawn PID %s is not running", host.name, host.pid)
            return False
        system_state = _system_state(state, host)
        if system_state != "running":
            log.info("%s: system state is %s", host.name, system_state)
            return False
    return True


def running_lab(supernodes: int = settings.DEFAULT_SUPERNODES, subnet: str = settings.DEFAULT_SUBNET,
                dataset: Path | None = None) -> LabState | None:
    """Return the state of a healthy lab of this shape, or None when no such lab is up."""
    state = load_state()
    dataset = (dataset or settings.default_dataset()).resolve()
    if state is None or not _same_shape(state, str(parse_subnet(subnet)), supernodes, dataset):
        return None
    return state if _is_healthy(state) else None


def up(supernodes: int = settings.DEFAULT_SUPERNODES, subnet: str = settings.DEFAULT_SUBNET,
       dataset: Path | None = None, mirror: str | None = None, boot_timeout: float = 120,
       keep_on_failure: bool = False) -> LabState:
    """Start a superlink and `supernodes` supernode hosts and wait until all are running.

    Returns the existing state unchanged when a healthy lab of the same shape
    is up. Raises LabError when a lab of another shape is up, on bad settings,
    or when a host fails to boot. A failed lab is torn down unless
    `keep_on_failure` is set.
    """
    check_prerequisites()
    network_range = parse_subnet(subnet)
    hosts = plan_hosts(network_range, supernodes)
    dataset = (dataset or settings.default_dataset()).resolve()
    rows = data.read_labels(dataset)
    state_dir = settings.state_dir()
    paths = _paths(state_dir)

    with _locked(state_dir):
        existing = read_state(paths["state"])
        if existing is not None:
            same_shape = _same_shape(existing, str(network_range), supernodes, dataset)
            if same_shape and _is_healthy(existing):
                log.info("up: a lab with %d supernodes on %s is already up and healthy", supernodes, existing.subnet)
                return existing

            # A running lab of another shape may be someone's work in progress,
            # so only an explicit `down` removes it.
            if not same_shape and any(nspawn.is_running(host.pid, host.name) for host in existing.hosts):
                raise LabError(
                    f"another lab is up ({len(existing.supernodes)} supernodes on {existing.subnet}, "
                    f"dataset {existing.dataset}); run `python -m melody_lab down` first"
                )
            log.info("up: tearing down the stale or unhealthy lab first")
            _down_locked(state_dir)

        started = time.monotonic()
        try:
            state = _start(hosts, network_range, dataset, rows, mirror, boot_timeout, state_dir)
        except Exception:
            if keep_on_failure:
                log.error("up: failed; the lab is left as it is for inspection, run down to remove it")
            else:
                log.error("up: failed; tearing the lab down (console logs stay in %s)", paths["logs"])
                _down_locked(state_dir)
            raise
        log.info("up: lab of %d hosts is running after %.1f s in total", len(hosts), time.monotonic() - started)
        return state


def _start(hosts: list[HostPlan], network_range, dataset: Path, rows: list[dict[str, str]],
           mirror: str | None, boot_timeout: float, state_dir: Path) -> LabState:
    """Do the work of `up` for a lab that is known to be down."""
    paths = _paths(state_dir)
    network.check_subnet_free(network_range, settings.BRIDGE_NAME)
    too_few = limits.check_inotify_room(len(hosts))
    if too_few:
        raise LabError(too_few)

    archive = rootfs.ensure_archive(settings.cache_dir(), mirror)
    rootfs.unpack(archive, paths["rootfs"])

    client_key = ssh.client_key(paths["ssh"])
    host_keys = {host.name: ssh.host_key(paths["ssh"], host.name) for host in hosts}
    known_hosts = paths["ssh"] / ssh.KNOWN_HOSTS
    ssh.write_known_hosts(known_hosts, [(host.name, host.address, host_keys[host.name]) for host in hosts])

    state = LabState(
        subnet=str(network_range),
        bridge=settings.BRIDGE_NAME,
        ssh_key=str(client_key),
        known_hosts=str(known_hosts),
        hosts=[HostState(name=host.name, role=host.role, address=host.address,
                         partition_id=host.partition_id, num_partitions=host.num_partitions,
                         data_dir=settings.HOST_DATA_DIR if host.role == "supernode" else None)
               for host in hosts],
        dataset=str(dataset),
        rootfs=str(archive),
    )
    # Saved before anything is mounted or started, so `down` can clean up
    # after a crash at any later step.
    save_state(state, paths["state"])
    network.create_bridge(state.bridge, bridge_interface(network_range))

    started = time.monotonic()
    client_public_key = Path(f"{client_key}.pub").read_text()
    columns = data.labels_columns(dataset)

    def prepare(host: HostPlan) -> None:
        dirs = overlay.HostDirs(paths["hosts"] / host.name)
        overlay.mount(paths["rootfs"], dirs)
        guest.prepare(dirs.merged, host, hosts, network_range.prefixlen, client_public_key, host_keys[host.name])
        if host.role == "supernode":
            shard = data.shard_rows(rows, host.partition_id, host.num_partitions)
            data.write_shard(dataset, shard, guest.guest_path(dirs.merged, settings.HOST_DATA_DIR), columns)
            log.info("%s: placed shard %d of %d (%d rows) at %s", host.name, host.partition_id,
                     host.num_partitions, len(shard), settings.HOST_DATA_DIR)

    # Copying thousands of small image files waits mostly on the disk, so
    # hosts are prepared in parallel.
    with ThreadPoolExecutor(max_workers=len(hosts)) as pool:
        for preparation in [pool.submit(prepare, host) for host in hosts]:
            preparation.result()
    log.info("up: prepared %d host trees in %.1f s", len(hosts), time.monotonic() - started)

    started = time.monotonic()
    for host_state in state.hosts:
        dirs = overlay.HostDirs(paths["hosts"] / host_state.name)
        host_state.pid = nspawn.launch(host_state.name, dirs.merged, state.bridge,
                                       paths["logs"] / f"{host_state.name}.log")
        save_state(state, paths["state"])

    with ThreadPoolExecutor(max_workers=len(hosts)) as pool:
        waits = {host.name: pool.submit(ssh.wait_until_running, host.name, host.address,
                                        client_key, known_hosts, boot_timeout)
                 for host in state.hosts}
    errors = []
    for name, wait in waits.items():
        try:
            wait.result()
        except ssh.HostNotReadyError as error:
            log.error("%s (console log: %s)", error, paths["logs"] / f"{name}.log")
            errors.append(str(error))
    if errors:
        raise LabError("lab hosts failed to boot:\n" + "\n".join(errors))
    log.info("up: booted %d hosts in %.1f s", len(hosts), time.monotonic() - started)
    return state


def down(purge: bool = False) -> None:
    """Stop every lab host and remove what the lab left on this machine.

    Keeps the SSH keys and console logs in the state dir for the next lab,
    unless `purge` is set. Does nothing when no lab is up.
    """
    check_prerequisites()
    state_dir = settings.state_dir()
    if not state_dir.exists():
        log.info("down: no lab state in %s, nothing to do", state_dir)
        return
    with _locked(state_dir):
        _down_locked(state_dir)
        if purge:
            for entry in state_dir.iterdir():
                if entry.is_dir():
                    shutil.rmtree(entry)
                elif entry.name != "lock":
                    entry.unlink()
            log.info("down: removed SSH keys and logs from %s", state_dir)


def _down_locked(state_dir: Path) -> None:
    paths = _paths(state_dir)
    state = read_state(paths["state"])
    host_dirs = sorted(paths["hosts"].iterdir()) if paths["hosts"].exists() else []
    bridge = state.bridge if state else settings.BRIDGE_NAME
    if state is None and not host_dirs and not paths["rootfs"].exists() and not network.is_bridge(bridge):
        log.info("down: no lab is up")
        return

    started = time.monotonic()
    pids = {host.name: host.pid for host in state.hosts} if state else {}
    # Also folders of hosts that never made it into the state file.
    names = sorted(set(pids) | {folder.name for folder in host_dirs})

    # Hosts are removed in parallel because powering off waits on the guest
    # and deleting thousands of small data files waits on the disk.
    with ThreadPoolExecutor(max_workers=max(1, len(names))) as pool:
        removals = {name: pool.submit(_remove_host, name, pids.get(name), paths["hosts"] / name)
                    for name in names}
    errors = []
    for name, removal in removals.items():
        try:
            removal.result()
        except (OSError, RuntimeError) as error:
            log.error("%s: removal failed: %s", name, error)
            errors.append(f"{name}: {error}")
    if errors:
        raise LabError("down: could not remove everything; fix the errors above and run down again:\n"
                       + "\n".join(errors))

    cgroups.remove_parents()
    network.delete_bridge(bridge)
    if paths["hosts"].exists():
        paths["hosts"].rmdir()
    if paths["rootfs"].exists():
        rootfs.remove_tree(paths["rootfs"])
    paths["state"].unlink(missing_ok=True)
    log.info("down: lab removed in %.1f s", time.monotonic() - started)


def _remove_host(name: str, pid: int | None, folder: Path) -> None:
    """Stop one host and delete its propagate folder, overlay, folders and cgroups."""
    nspawn.stop(pid, name)
    remaining = cgroups.processes(name)
    if remaining:
        raise RuntimeError(f"processes still run in its cgroup: {remaining}")
    nspawn.remove_propagate_dir(name)
    dirs = overlay.HostDirs(folder)
    overlay.unmount(dirs)
    overlay.remove(dirs)
    cgroups.remove(name)


def host_memory_kib(name: str, nspawn_pid: int | None) -> int:
    """Return the proportional set size of the host's processes in KiB, nspawn itself excluded."""
    total = 0
    for pid in cgroups.processes(name):
        if pid == nspawn_pid:
            continue
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


def status() -> list[dict]:
    """Return one record per lab host: name, address, PID, whether it runs, system state and memory."""
    state = load_state()
    if state is None:
        return []
    records = []
    for host in state.hosts:
        running = nspawn.is_running(host.pid, host.name)
        system_state = _system_state(state, host) if running else "stopped"
        records.append({
            "name": host.name,
            "role": host.role,
            "address": host.address,
            "pid": host.pid,
            "nspawn_running": running,
            "system_state": system_state,
            "memory_kib": host_memory_kib(host.name, host.pid) if running else 0,
        })
    return records
