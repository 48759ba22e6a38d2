"""A Docker daemon of the project's own, started by hand and removed without a trace.

The Compose example's test needs a Docker engine on a machine that has no
systemd and that runs other network namespaces (the labs) with their own
bridges and routes. So this daemon changes nothing outside its folder:

- IP forwarding, masquerading and firewall management are off, and there is
  no default bridge, so the host's sysctls, routes and rules stay as they are;
- its data, run-time state, PID file, socket and configuration file all live
  under one folder of this project, never at Docker's system paths;
- `stop()` removes its containers and networks, stops the daemon by its PID,
  then removes any bridge, mount or shim process it left behind.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

# Debian's docker.io package (scripts/install-docker.sh). The full path keeps
# another docker CLI earlier on PATH from talking to this engine.
# NOTE: only docker-compose 1.29 (Debian's) is tested; the `docker compose`
# plugin of Docker's own packages is not used.
DOCKERD = "/usr/sbin/dockerd"
DOCKER = "/usr/bin/docker"
DOCKER_COMPOSE = "/usr/bin/docker-compose"

# Flags that keep the daemon off the host's network configuration.
NETWORK_FLAGS = (
    "--iptables=false",
    "--ip-forward=false",
    "--ip-masq=false",
    "--bridge=none",
)

START_TIMEOUT_S = 60
STOP_TIMEOUT_S = 30

# Linux limits a unix socket path to 107 bytes, and containerd's sockets sit
# under the exec root with about 40 more characters.
MAX_ROOT_LENGTH = 60


class DockerdError(RuntimeError):
    """The daemon could not be started or used. The message names the fix."""


def bridge_names() -> set[str]:
    """Names of the bridge interfaces on this machine."""
    return {path.name for path in Path("/sys/class/net").iterdir() if (path / "bridge").is_dir()}


def mounts_under(folder: Path) -> list[str]:
    """Mount points at or under `folder`, deepest first (from /proc/self/mountinfo)."""
    prefix = str(folder.resolve())
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4]
        if point == prefix or point.startswith(prefix + "/"):
            points.append(point)
    return sorted(points, key=len, reverse=True)


def processes_naming(text: str) -> list[int]:
    """PIDs of processes whose command line contains `text`, such as the daemon's exec root."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            arguments = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in arguments and int(cmdline.parent.name) != os.getpid():
            pids.append(int(cmdline.parent.name))
    return pids


@dataclass
class Dockerd:
    """One Docker daemon whose every file is under `root`.

    `Dockerd.existing()` is instead the Docker engine that the caller's
    environment selects (DOCKER_HOST or the default socket). It is used but
    never started or stopped.
    """

    root: Path | None
    process: subprocess.Popen | None = None
    bridges_before: set[str] = field(default_factory=set)

    @property
    def socket(self) -> Path:
        return self.root / "docker.sock"

    @property
    def exec_root(self) -> Path:
        return self.root / "exec"

    @property
    def data_root(self) -> Path:
        return self.root / "data"

    @property
    def pidfile(self) -> Path:
        return self.root / "dockerd.pid"

    @property
    def log_file(self) -> Path:
        return self.root / "dockerd.log"

    @classmethod
    def existing(cls) -> "Dockerd":
        return cls(root=None)

    def environment(self) -> dict[str, str]:
        """Environment for docker and docker-compose that points them at this daemon only."""
        if self.root is None:
            return dict(os.environ)
        environment = {key: value for key, value in os.environ.items() if not key.startswith("DOCKER_")}
        environment["DOCKER_HOST"] = f"unix://{self.socket}"
        # No credentials or CLI plugins from the user's own ~/.docker.
        environment["DOCKER_CONFIG"] = str(self.root / "client-config")
        return environment

    def command(self) -> list[str]:
        return [
            DOCKERD,
            "--config-file", str(self.root / "daemon.json"),
            "--data-root", str(self.data_root),
            "--exec-root", str(self.exec_root),
            "--pidfile", str(self.pidfile),
            "--host", f"unix://{self.socket}",
            *NETWORK_FLAGS,
            "--exec-opt", "native.cgroupdriver=cgroupfs",
        ]

    def docker(self, *arguments: str, check: bool = True, timeout: float = 300,
               input_bytes: bytes | None = None) -> subprocess.CompletedProcess:
        """Run the docker CLI against this daemon."""
        result = subprocess.run([DOCKER, *arguments], env=self.environment(), capture_output=True,
                                timeout=timeout, check=False, input=input_bytes)
        if check and result.returncode != 0:
            raise DockerdError(f"docker {' '.join(arguments[:3])} failed with exit code {result.returncode}: "
                               f"{result.stderr.decode(errors='replace').strip()[-1500:]}")
        return result

    def start(self) -> None:
        """Start the daemon and wait until it responds to `docker version`."""
        if self.root is None:
            raise DockerdError("Dockerd.existing() is a daemon started elsewhere, so it cannot be started here")
        for tool in (DOCKERD, DOCKER, DOCKER_COMPOSE):
            if not Path(tool).is_file():
                raise DockerdError(f"{tool} is missing; run `bash scripts/install-docker.sh` as root")
        if len(str(self.root.resolve())) > MAX_ROOT_LENGTH:
            raise DockerdError(f"daemon folder {self.root} is longer than {MAX_ROOT_LENGTH} characters, "
                               f"too long for containerd's sockets; use a shorter path")
        if self.pidfile.exists() and Path(f"/proc/{self.pidfile.read_text().strip()}").exists():
            raise DockerdError(f"a daemon from {self.root} still runs as PID {self.pidfile.read_text().strip()}; "
                               f"stop it first (Dockerd(root).stop())")

        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "client-config").mkdir(exist_ok=True)
        # Its own empty configuration, so /etc/docker/daemon.json cannot add bridges or rules.
        (self.root / "daemon.json").write_text(json.dumps({}) + "\n")
        self.bridges_before = bridge_names()

        logger.info("dockerd: starting in %s: %s", self.root, " ".join(self.command()))
        with self.log_file.open("ab") as log:
            self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)

        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise DockerdError(f"dockerd exited with code {self.process.returncode} while starting; "
                                   f"its log is {self.log_file}:\n{self.log_tail()}")
            if self.socket.exists() and self.docker("version", check=False, timeout=10).returncode == 0:
                logger.info("dockerd: PID %d responds on %s", self.process.pid, self.socket)
                return
            time.sleep(0.5)
        self.stop()
        raise DockerdError(f"dockerd timed out: no response on {self.socket} within {START_TIMEOUT_S} s; "
                           f"its log is {self.log_file}")

    def log_tail(self, lines: int = 30) -> str:
        if not self.log_file.exists():
            return ""
        return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])

    def pid(self) -> int | None:
        if self.process is not None and self.process.poll() is None:
            return self.process.pid
        if self.pidfile.exists():
            text = self.pidfile.read_text().strip()
            if text.isdigit() and Path(f"/proc/{text}").exists():
                return int(text)
        return None

    def remove_containers_and_networks(self) -> None:
        """Force-remove every container and user network of this daemon."""
        listing = self.docker("ps", "--all", "--quiet", check=False, timeout=30)
        containers = listing.stdout.decode().split()
        if containers:
            logger.info("dockerd: removing %d containers", len(containers))
            self.docker("rm", "--force", "--volumes", *containers, check=False, timeout=120)
        self.docker("network", "prune", "--force", check=False, timeout=60)

    def stop(self) -> None:
        """Remove containers and networks, stop the daemon by its PID, then remove what it left.

        Safe to call more than once and after a failed start.
        """
        if self.root is None:
            return
        pid = self.pid()
        if pid is not None:
            self.remove_containers_and_networks()
            logger.info("dockerd: stopping PID %d", pid)
            os.kill(pid, signal.SIGTERM)
            self.wait_gone(pid, STOP_TIMEOUT_S)
            if Path(f"/proc/{pid}").exists():
                logger.error("dockerd: PID %d still runs %d s after SIGTERM; sending SIGKILL", pid, STOP_TIMEOUT_S)
                os.kill(pid, signal.SIGKILL)
                self.wait_gone(pid, 10)
        if self.process is not None and self.process.poll() is None:
            self.process.wait(timeout=10)

        # containerd and its shims are started by this daemon and name its exec root.
        for leftover in processes_naming(str(self.exec_root)):
            logger.error("dockerd: process %d of the daemon outlived it; sending SIGKILL", leftover)
            try:
                os.kill(leftover, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for point in mounts_under(self.root):
            logger.info("dockerd: unmounting leftover %s", point)
            subprocess.run(["umount", "--lazy", point], check=False)
        for bridge in sorted(bridge_names() - self.bridges_before):
            if bridge.startswith("br-") or bridge == "docker0":
                logger.info("dockerd: removing leftover bridge %s", bridge)
                subprocess.run(["ip", "link", "delete", bridge], check=False)
        self.pidfile.unlink(missing_ok=True)
        self.socket.unlink(missing_ok=True)

    @staticmethod
    def wait_gone(pid: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            # Reap it when it is this process's child, so it does not stay a zombie.
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
            time.sleep(0.2)
