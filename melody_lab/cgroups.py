"""One cgroup per lab host, from which that host's systemd-nspawn is started.

With --keep-unit, nspawn puts the guest's systemd into `<own cgroup>/payload`.
Hosts started from one shared cgroup would share that payload tree and boot
degraded at random, so each nspawn first moves into a cgroup of its own.
"""

import logging
import os
from pathlib import Path

from melody_lab.settings import CGROUP_PARENT

log = logging.getLogger(__name__)

CGROUP_MOUNT = Path("/sys/fs/cgroup")


def hierarchy_roots() -> list[Path]:
    """Return the cgroup hierarchies that systemd uses on this machine.

    Hybrid setups have the named v1 hierarchy `systemd` plus v2 at `unified`;
    a pure v2 setup has v2 mounted at /sys/fs/cgroup itself.
    """
    filesystem_types = {}
    with open("/proc/self/mounts") as mounts:
        for line in mounts:
            _, point, filesystem_type = line.split()[:3]
            filesystem_types[Path(point)] = filesystem_type

    if filesystem_types.get(CGROUP_MOUNT) == "cgroup2":
        # NOTE: the pure v2 layout is detected, but the lab was only run on
        # hybrid hierarchies.
        return [CGROUP_MOUNT]
    roots = [CGROUP_MOUNT / "systemd", CGROUP_MOUNT / "unified"]
    missing = [str(root) for root in roots if root not in filesystem_types]
    if missing:
        raise RuntimeError(f"cgroup hierarchy not mounted: {', '.join(missing)}")
    return roots


def host_cgroups(name: str) -> list[Path]:
    """Return the cgroup folders of one host, one per hierarchy."""
    return [root / CGROUP_PARENT / name for root in hierarchy_roots()]


def create(name: str) -> list[Path]:
    """Create the host's cgroups and return their folders."""
    folders = host_cgroups(name)
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
    return folders


def enter(folders: list[Path]) -> None:
    """Move the calling process into `folders`; meant to run in a child before exec."""
    for folder in folders:
        (folder / "cgroup.procs").write_text(f"{os.getpid()}\n")


def processes(name: str) -> list[int]:
    """Return the PIDs in the host's cgroup tree, guest processes included."""
    pids = set()
    for folder in host_cgroups(name):
        for current, _, _ in os.walk(folder):
            try:
                pids.update(int(pid) for pid in (Path(current) / "cgroup.procs").read_text().split())
            except FileNotFoundError:
                continue
    return sorted(pids)


def remove(name: str) -> None:
    """Delete the host's cgroup folders, deepest first, as cgroupfs requires."""
    for folder in host_cgroups(name):
        if not folder.exists():
            continue
        for current, _, _ in os.walk(folder, topdown=False):
            try:
                os.rmdir(current)
            except OSError as error:
                log.error("%s: cannot remove cgroup %s: %s", name, current, error)
                break


def remove_parents() -> None:
    """Delete the lab's parent cgroups when no host cgroup is left in them."""
    for root in hierarchy_roots():
        parent = root / CGROUP_PARENT
        if parent.exists() and not any(entry.is_dir() for entry in parent.iterdir()):
            os.rmdir(parent)
