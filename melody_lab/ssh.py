"""SSH keys of the lab and commands run on lab hosts over real SSH.

The lab owns one client key that root accepts on every host, a fixed host key
per host, and a known_hosts file for both, so host-key checking stays on.
"""

import logging
import subprocess
import time
from pathlib import Path

log = logging.getLogger(__name__)

CLIENT_KEY = "id_ed25519"
KNOWN_HOSTS = "known_hosts"
HOST_KEY = "ssh_host_ed25519_key"


class HostNotReadyError(RuntimeError):
    """A lab host did not finish booting, or booted with failed units."""


def ensure_key(path: Path, comment: str) -> Path:
    """Create an ed25519 key pair at `path` unless one exists, and return the private key path."""
    if not path.is_file():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
            check=True, capture_output=True, text=True,
        )
    return path


def client_key(ssh_dir: Path) -> Path:
    """Return the lab's client key, creating it on first use."""
    return ensure_key(ssh_dir / CLIENT_KEY, "melody-lab")


def host_key(ssh_dir: Path, name: str) -> Path:
    """Return the host key of lab host `name`, creating it on first use.

    Keys live in the state dir's ssh folder, so a host that is recreated under
    the same name keeps its key.
    """
    return ensure_key(ssh_dir / "hosts" / name / HOST_KEY, f"root@{name}")


def write_known_hosts(path: Path, entries: list[tuple[str, str, Path]]) -> None:
    """Write a known_hosts line for each (name, address, host key) that lists both name and address."""
    lines = []
    for name, address, key in entries:
        algorithm, public_key = Path(f"{key}.pub").read_text().split()[:2]
        lines.append(f"{name},{address} {algorithm} {public_key}\n")
    path.write_text("".join(lines))


def ssh_command(key: Path, known_hosts: Path, address: str, command: str, connect_timeout: int = 5) -> list[str]:
    """Return the argv that runs `command` as root on a lab host with host-key checking on."""
    return [
        "ssh", "-i", str(key),
        "-o", "IdentitiesOnly=yes",
        "-o", "BatchMode=yes",
        "-o", "StrictHostKeyChecking=yes",
        "-o", f"UserKnownHostsFile={known_hosts}",
        "-o", "GlobalKnownHostsFile=/dev/null",
        "-o", f"ConnectTimeout={connect_timeout}",
        "-o", "LogLevel=ERROR",
        f"root@{address}", command,
    ]


def run(key: Path, known_hosts: Path, address: str, command: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run `command` on a lab host and return the finished process, output as text."""
    return subprocess.run(ssh_command(key, known_hosts, address, command),
                          capture_output=True, text=True, timeout=timeout)


def wait_until_running(name: str, address: str, key: Path, known_hosts: Path, timeout: float) -> float:
    """Wait until the host accepts SSH and systemd has finished booting, and return the seconds waited.

    Raises HostNotReadyError listing the failed units when the host boots
    degraded, or when it does not finish in `timeout` seconds.
    """
    started = time.monotonic()
    deadline = started + timeout
    attempts = 0
    last_error = ""
    while time.monotonic() < deadline:
        attempts += 1
        try:
            result = run(key, known_hosts, address, "systemctl is-system-running --wait",
                         timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            last_error = "systemctl is-system-running --wait timed out"
            break
        state = result.stdout.strip()

        # SSH itself failed: sshd is not listening yet, so try again shortly.
        if result.returncode == 255:
            last_error = result.stderr.strip()
            log.debug("%s: SSH attempt %d failed: %s", name, attempts, last_error)
            time.sleep(0.3)
            continue

        if state == "running":
            waited = time.monotonic() - started
            log.info("%s: running after %.1f s (%d SSH attempts)", name, waited, attempts)
            return waited

        failed = run(key, known_hosts, address, "systemctl --failed --no-legend --plain", timeout=30)
        raise HostNotReadyError(
            f"{name} ({address}) booted {state or 'with unknown state'}; failed units:\n"
            f"{failed.stdout.strip() or '(none listed)'}"
        )

    raise HostNotReadyError(
        f"{name} ({address}) was not running after {timeout:.0f} s and {attempts} SSH attempts: {last_error}"
    )
