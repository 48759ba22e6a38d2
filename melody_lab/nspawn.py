"""Start and stop the systemd-nspawn process that runs one lab host."""

import logging
import os
import signal
import subprocess
import time
from pathlib import Path

from melody_lab import cgroups
from melody_lab.settings import machine_name

log = logging.getLogger(__name__)

PROPAGATE_DIR = Path("/run/systemd/nspawn/propagate")


def command(name: str, root: Path, bridge: str) -> list[str]:
    """Return the systemd-nspawn argv that boots host `name` from `root`."""
    return [
        "systemd-nspawn",
        "--boot",
        # This machine has no systemd as PID 1, so nspawn must not ask it to
        # register the machine or create a scope unit.
        "--register=no",
        "--keep-unit",
        f"--machine={machine_name(name)}",
        f"--directory={root}",
        f"--network-bridge={bridge}",
        # Allows the bpf() call, which systemd needs inside the host to apply
        # IPAddressDeny= and similar unit sandboxing.
        "--system-call-filter=bpf",
        # Ignore any .nspawn settings files of this machine, keep the guest's
        # journal inside the guest, and leave its /etc/resolv.conf alone.
        "--settings=false",
        "--link-journal=no",
        "--resolv-conf=off",
        # Boot messages go to the console log file, and nothing types into it.
        "--console=read-only",
    ]


def launch(name: str, root: Path, bridge: str, log_path: Path) -> int:
    """Start host `name` in the background from a cgroup of its own, returning nspawn's PID."""
    folders = cgroups.create(name)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as console_log:
        process = subprocess.Popen(
            command(name, root, bridge),
            stdin=subprocess.DEVNULL,
            stdout=console_log,
            stderr=subprocess.STDOUT,
            # Runs in the child between fork and exec, so nspawn itself starts
            # inside the host's cgroup.
            preexec_fn=lambda: cgroups.enter(folders),
            # A session of its own keeps the host alive when the terminal that
            # ran `up` closes.
            start_new_session=True,
        )
    log.info("%s: started systemd-nspawn, PID %d, console log %s", name, process.pid, log_path)
    return process.pid


def is_running(pid: int | None, name: str) -> bool:
    """Return whether `pid` is a live systemd-nspawn of host `name`.

    Checking the command line keeps the lab from signalling an unrelated
    process that reused a PID from stale state.
    """
    if pid is None:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        arguments = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (FileNotFoundError, ProcessLookupError):
        return False
    # The state letter follows the command name in brackets, and Z marks a zombie.
    if stat.rsplit(")", 1)[1].split()[0] == "Z":
        return False
    return (os.path.basename(arguments[0]) == b"systemd-nspawn"
            and f"--machine={machine_name(name)}".encode() in arguments)


def _reap(pid: int) -> None:
    """Collect the exit status when this process started the nspawn itself."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def _wait_for_exit(pid: int, name: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _reap(pid)
        if not is_running(pid, name):
            return True
        time.sleep(0.1)
    return False


def stop(pid: int | None, name: str, timeout: float = 30) -> None:
    """Power the host off with SIGTERM to its nspawn, then SIGKILL what is left after `timeout` seconds."""
    if is_running(pid, name):
        started = time.monotonic()
        log.info("%s: sending SIGTERM to systemd-nspawn PID %d", name, pid)
        os.kill(pid, signal.SIGTERM)
        if _wait_for_exit(pid, name, timeout):
            log.info("%s: PID %d exited after %.1f s", name, pid, time.monotonic() - started)
        else:
            log.warning("%s: PID %d still running after %.0f s, sending SIGKILL", name, pid, timeout)
            os.kill(pid, signal.SIGKILL)
            _wait_for_exit(pid, name, 10)
    elif pid is not None:
        log.info("%s: systemd-nspawn PID %d is already gone", name, pid)
        _reap(pid)

    # A killed nspawn can leave guest processes behind. They sit in the host's
    # own cgroup, so everything there was started by the lab.
    leftovers = cgroups.processes(name)
    if leftovers:
        log.warning("%s: sending SIGKILL to processes left in its cgroup: %s", name, leftovers)
        for leftover in leftovers:
            try:
                os.kill(leftover, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        while cgroups.processes(name) and time.monotonic() < deadline:
            time.sleep(0.1)


def remove_propagate_dir(name: str) -> None:
    """Delete the folder nspawn creates under /run for mounts into the host.

    /run on this machine is no tmpfs, so nothing else clears it.
    """
    folder = PROPAGATE_DIR / machine_name(name)
    if folder.exists():
        for current, folders, files in os.walk(folder, topdown=False):
            for file in files:
                os.unlink(os.path.join(current, file))
            for child in folders:
                os.rmdir(os.path.join(current, child))
        os.rmdir(folder)
