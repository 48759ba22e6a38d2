"""The lab researcher's SSH tunnel to the SuperLink's Control API.

This machine plays the researcher: it opens the tunnel with the lab's
researcher key, from the lab bridge's address, which the lab inventory lists
as the only researcher network.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import subprocess
import time
from pathlib import Path

from melody_deploy.researcher import load_inventory, tunnel_command

from . import settings

log = logging.getLogger(__name__)

LAB_INVENTORY = settings.REPO_ROOT / "inventories" / "lab.py"
# Seconds to wait for the tunnel's local port to accept connections.
OPEN_TIMEOUT = 20


def researcher_key() -> Path:
    return settings.state_dir() / "researcher" / "id_ed25519"


def free_local_port() -> int:
    """Return a loopback port that is free now, so labs side by side do not collide."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def lab_tunnel_command(port: int, inventory: Path = LAB_INVENTORY) -> list[str]:
    options = [
        "-i", str(researcher_key()),
        "-o", "IdentitiesOnly=yes",
        "-o", "BatchMode=yes",
        "-o", f"UserKnownHostsFile={settings.state_dir() / 'ssh' / 'known_hosts'}",
        "-o", "StrictHostKeyChecking=yes",
    ]
    return tunnel_command(load_inventory(inventory), port, options)


def wait_for_port(port: int, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + OPEN_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the SSH tunnel exited with {process.returncode}: {process.stderr.read()}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.3)
    raise RuntimeError(f"the SSH tunnel did not open 127.0.0.1:{port} within {OPEN_TIMEOUT} s")


@contextlib.contextmanager
def control_tunnel(port: int | None = None, inventory: Path = LAB_INVENTORY):
    """Open the tunnel on `port` (default: a free one), yield the port, close it on exit.

    `inventory` is a lab inventory; its SuperLink's settings name the Control API's port.
    """
    port = port or free_local_port()
    command = lab_tunnel_command(port, inventory)
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log.info("tunnel: started ssh (pid %d) forwarding 127.0.0.1:%d to the Control API", process.pid, port)
    try:
        wait_for_port(port, process)
        yield port
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.info("tunnel: stopped ssh (pid %d)", process.pid)
