"""Bring the Compose example up and down: images, TLS files, SuperNode keys, .env and services.

`up` runs the steps in the order the SuperLink needs them. It builds the
images offline, then makes the CA and SuperLink certificate (tls.py, as the
pyinfra deploy makes them), one key pair per SuperNode and the .env file. It
starts the SuperLink, registers each SuperNode's public key through the
Control API, starts the SuperNodes and waits until both are online.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from . import compose, compose_images, tls, units
from .dockerd import DOCKER_COMPOSE, Dockerd
from .researcher import write_connection
from .security import superlink_names
from .supernode_auth import GENERATE_KEY

logger = logging.getLogger(__name__)

CONNECTION = compose.CONNECTION
REGISTER_TIMEOUT_S = 90
ONLINE_TIMEOUT_S = 120
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")


class StackError(RuntimeError):
    """A step of `up` or `down` failed. The message names the step and where to look."""


@dataclass
class Stack:
    """The Compose example in one project, with its files in `run_dir`."""

    run_dir: Path
    project: str = compose.DEFAULT_PROJECT
    # None uses the Docker host that DOCKER_HOST names (or the default one).
    daemon: Dockerd | None = None

    @property
    def env_file(self) -> Path:
        return self.run_dir / ".env"

    @property
    def tls_dir(self) -> Path:
        return self.run_dir / "tls"

    @property
    def keys_dir(self) -> Path:
        return self.run_dir / "keys"

    @property
    def flwr_home(self) -> Path:
        return self.run_dir / "flwr-home"

    def environment(self) -> dict[str, str]:
        return (self.daemon or Dockerd.existing()).environment()

    def run_compose(self, *arguments: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
        """Run docker-compose on the example's compose.yml with this run's .env file."""
        command = [DOCKER_COMPOSE, "--project-name", self.project, "--env-file", str(self.env_file),
                   "--file", str(compose.COMPOSE_FILE), *arguments]
        result = subprocess.run(command, env=self.environment(), capture_output=True, text=True,
                                timeout=timeout, check=False)
        if check and result.returncode != 0:
            raise StackError(f"docker-compose {' '.join(arguments)} failed with exit code {result.returncode}: "
                             f"{result.stderr.strip()[-1500:]}")
        return result

    def flwr(self, *arguments: str, timeout: float | None = 120) -> subprocess.CompletedProcess:
        """Run the researcher's flwr CLI in a new researcher container on the internal network."""
        return self.run_compose("run", "--rm", "-T", compose.RESEARCHER_SERVICE, "flwr", *arguments,
                                timeout=timeout, check=False)

    def prepare_files(self, *, image: str, sites: list[Path]) -> None:
        """Write the TLS files, SuperNode keys, .env and the researcher's connection."""
        settings = compose.federation().superlink.settings
        self.run_dir.mkdir(parents=True, exist_ok=True)

        # The names the deploy puts in the certificate: the SuperLink's
        # service name, by which SuperNodes and the researcher reach it, and
        # loopback, where its own ServerApp runtime connects.
        names = superlink_names(compose.federation())
        files = tls.ensure_generated(self.tls_dir, names, settings["melody_tls_valid_days"],
                                     settings["melody_tls_renew_days"])
        # The SuperLink runs as the service user, which must read its key.
        os.chown(files.server_key, compose_images.SERVICE_UID, compose_images.SERVICE_UID)

        self.keys_dir.mkdir(mode=0o700, exist_ok=True)
        for name in compose.SUPERNODE_SERVICES:
            key = self.keys_dir / f"{name}.key"
            if not key.exists():
                logger.info("compose: generating the authentication key of %s", name)
                subprocess.run([sys.executable, "-c", GENERATE_KEY, str(key)], check=True)
            os.chown(key, compose_images.SERVICE_UID, compose_images.SERVICE_UID)

        self.env_file.write_text(compose.render_env(project=self.project, image=image, tls_dir=self.tls_dir,
                                                    keys_dir=self.keys_dir, researcher_home=self.flwr_home,
                                                    sites=sites))
        # Paths inside the researcher's container.
        write_connection(self.flwr_home / "config.toml", CONNECTION, {
            "address": f"{compose.SUPERLINK_SERVICE}:{settings['melody_superlink_port']}",
            "root-certificates": units.REMOTE_TLS.ca_certificate,
        })
        for path in (self.flwr_home, *self.flwr_home.iterdir()):
            os.chown(path, compose_images.SERVICE_UID, compose_images.SERVICE_UID)

    def register_supernodes(self) -> None:
        """Register each SuperNode's public key, retrying until the SuperLink responds."""
        for name in compose.SUPERNODE_SERVICES:
            # The researcher's Flower home is the folder its container mounts.
            shutil.copyfile(self.keys_dir / f"{name}.key.pub", self.flwr_home / f"{name}.pub")
            public_key = f"{compose.RESEARCHER_HOME}/{name}.pub"
            deadline = time.monotonic() + REGISTER_TIMEOUT_S
            while True:
                result = self.flwr("supernode", "register", public_key, CONNECTION)
                output = ANSI_ESCAPE.sub("", result.stdout + result.stderr)
                if result.returncode == 0:
                    logger.info("compose: registered the key of %s", name)
                    break
                if "already in use" in output:
                    logger.info("compose: the SuperLink already knows the key of %s", name)
                    break
                if time.monotonic() > deadline:
                    raise StackError(f"registering {name} failed for {REGISTER_TIMEOUT_S} s: {output.strip()[-800:]}; "
                                     f"see `docker-compose logs superlink`")
                logger.info("compose: SuperLink not ready to register %s yet; retrying", name)
                time.sleep(2)

    def online_nodes(self) -> int:
        result = self.flwr("supernode", "list", CONNECTION, "--format", "json")
        if result.returncode != 0:
            return 0
        nodes = json.loads(result.stdout).get("nodes", [])
        return sum(1 for node in nodes if node.get("status") == "online")

    def wait_online(self) -> None:
        expected = len(compose.SUPERNODE_SERVICES)
        deadline = time.monotonic() + ONLINE_TIMEOUT_S
        while (online := self.online_nodes()) < expected:
            if time.monotonic() > deadline:
                logs = self.run_compose("logs", "--tail", "20", check=False).stdout
                raise StackError(f"{online} of {expected} SuperNodes online after {ONLINE_TIMEOUT_S} s; "
                                 f"last service logs:\n{logs[-3000:]}")
            time.sleep(2)
        logger.info("compose: %d of %d SuperNodes online", expected, expected)

    def up(self, *, sites: list[Path], rootfs: Path | None = None) -> None:
        """Build, write and start everything; return once both SuperNodes are online."""
        # Bad input stops here, before any image, file or container is made.
        if len(sites) != len(compose.SUPERNODE_SERVICES):
            raise StackError(f"give one --site per SuperNode ({len(compose.SUPERNODE_SERVICES)}), got {len(sites)}")
        for site in sites:
            if not (site / "labels.csv").is_file():
                raise StackError(f"--site {site}: labels.csv not found there; give a SuperNode's data folder "
                                 f"(labels.csv and its images)")
        if rootfs is not None:
            if not rootfs.is_file():
                raise StackError(f"--rootfs {rootfs}: file not found; omit --rootfs to use the lab's archive")
            compose_images.base_tag(rootfs)
        daemon = self.daemon or Dockerd.existing()
        if rootfs is None:
            from melody_lab import rootfs as lab_rootfs, settings as lab_settings  # pylint: disable=import-outside-toplevel
            rootfs = lab_rootfs.ensure_archive(lab_settings.cache_dir())
        images = compose_images.build(daemon, compose.image_settings(), rootfs)

        self.prepare_files(image=images.service, sites=sites)
        logger.info("compose: starting the SuperLink")
        self.run_compose("up", "--detach", "--no-build", compose.SUPERLINK_SERVICE)
        self.register_supernodes()
        logger.info("compose: starting the SuperNodes")
        self.run_compose("up", "--detach", "--no-build", *compose.SUPERNODE_SERVICES)
        self.wait_online()

    def down(self, *, volumes: bool = False) -> None:
        """Stop and remove the services and network; with `volumes`, their state too."""
        if not self.env_file.exists():
            logger.info("compose: %s is missing, so project %s was never brought up here", self.env_file, self.project)
            return
        self.run_compose("down", "--remove-orphans", *(["--volumes"] if volumes else []), timeout=180)
        logger.info("compose: project %s is down%s", self.project, " with its volumes" if volumes else "")
