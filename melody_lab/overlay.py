"""Per-host overlay filesystems over the one shared, read-only root filesystem."""

import logging
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from melody_lab.rootfs import mount_points

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HostDirs:
    """The folders of one host: overlay upper, overlay work dir, merged view and log."""

    base: Path

    @property
    def upper(self) -> Path:
        return self.base / "upper"

    @property
    def work(self) -> Path:
        return self.base / "work"

    @property
    def merged(self) -> Path:
        return self.base / "root"


def mount(lower: Path, dirs: HostDirs) -> None:
    """Mount the host's overlay at `dirs.merged`."""
    for folder in (dirs.upper, dirs.work, dirs.merged):
        folder.mkdir(parents=True, exist_ok=True)
    options = f"lowerdir={lower},upperdir={dirs.upper},workdir={dirs.work}"
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", options, str(dirs.merged)],
                   check=True, capture_output=True, text=True)


def is_mounted(path: Path) -> bool:
    """Return whether `path` is a mount point."""
    return path in mount_points()


def unmount(dirs: HostDirs) -> None:
    """Unmount the host's overlay if it is mounted."""
    if not is_mounted(dirs.merged):
        return
    result = subprocess.run(["umount", str(dirs.merged)], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"umount {dirs.merged} failed: {result.stderr.strip()}")


def remove(dirs: HostDirs) -> None:
    """Delete the host's folders, raising RuntimeError while anything is mounted below them.

    The check matters because deleting through a mounted overlay would delete
    files of the shared root filesystem.
    """
    if not dirs.base.exists():
        return
    mounted = [point for point in mount_points() if dirs.base in point.parents]
    if mounted:
        raise RuntimeError(f"cannot delete {dirs.base}: still mounted: {', '.join(map(str, mounted))}")
    shutil.rmtree(dirs.base)
