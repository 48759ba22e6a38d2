"""Kernel limits that a lab of many hosts reaches before memory or CPU.

Every guest's systemd and its services open inotify instances, and all lab
hosts run as root on this machine without user namespaces, so they share
root's `fs.inotify.max_user_instances` (128 by default on Debian 12). A host
that finds none left boots degraded, with path units failed.
"""

import logging
from pathlib import Path

log = logging.getLogger(__name__)

MAX_INSTANCES_FILE = Path("/proc/sys/fs/inotify/max_user_instances")

# Measured on booted bookworm lab hosts: 8 instances each (systemd, journald,
# logind, networkd and friends), rounded up to leave room for services.
INSTANCES_PER_HOST = 10


def inotify_instances_in_use() -> int:
    """Count the inotify instances open on this machine (all users, so an upper bound for root's)."""
    count = 0
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            for fd in fd_dir.iterdir():
                try:
                    if fd.readlink() == Path("anon_inode:inotify"):
                        count += 1
                except OSError:
                    continue
        except OSError:
            continue
    return count


def check_inotify_room(hosts: int) -> str | None:
    """Return why `hosts` more lab hosts would exhaust inotify instances, or None when they fit."""
    limit = int(MAX_INSTANCES_FILE.read_text())
    in_use = inotify_instances_in_use()
    needed = hosts * INSTANCES_PER_HOST
    log.info("inotify instances: %d in use, %d needed for %d hosts, limit %d", in_use, needed, hosts, limit)
    if in_use + needed <= limit:
        return None
    return (
        f"{hosts} hosts need about {needed} inotify instances, but {in_use} of the limit of {limit} "
        f"(fs.inotify.max_user_instances) are in use; raise it first, for example with "
        f"`sysctl -w fs.inotify.max_user_instances={max(512, in_use + needed)}`"
    )
