"""The Compose example's images, built offline from a Debian root filesystem and the wheelhouse.

Nothing is pulled from a registry. The base image is `docker import` of the
lab's debootstrapped root filesystem. The service image adds the service
user and the same hash-pinned venv that the pyinfra deploy installs on a
host (`install.venv_install_script`), from the same wheelhouse. Both images are
tagged by what they were made from, so an unchanged recipe reuses them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from . import wheelhouse as wheelhouses
from .dockerd import Dockerd
from .install import venv_install_script
from .plan import HostPlan
from .preflight import ResolvedHost
from .units import host_paths

logger = logging.getLogger(__name__)

BASE_REPOSITORY = "melody-base"
SERVICE_REPOSITORY = "melody-flwr"
# Fixed ids, so that files the operator's machine writes for the services
# (the TLS key, the SuperNode keys) can be given to this user.
SERVICE_UID = 10001
# Raise this when the service image's recipe below changes.
RECIPE_VERSION = "1"

ARCHIVE_PATTERN = re.compile(r"^rootfs-(?P<suite>[a-z]+)-(?P<key>[0-9a-f]+)\.tar\.gz$")

# Prints the facts the wheelhouse is built for, in the shape of host_facts.PythonPlatform.
PLATFORM_PROBE = (
    "import json, platform, sys; "
    "print(json.dumps({'python': list(sys.version_info[:2]), 'machine': platform.machine(), "
    "'libc': list(platform.libc_ver())}))"
)


class ImageError(RuntimeError):
    """An image could not be built; the message names the fix."""


@dataclass(frozen=True)
class Images:
    """Tags of the built images and what the service image holds."""

    base: str
    service: str
    venv: str
    wheelhouse_id: str


def image_exists(daemon: Dockerd, tag: str) -> bool:
    return daemon.docker("image", "inspect", tag, check=False, timeout=30).returncode == 0


def base_tag(archive: Path) -> str:
    match = ARCHIVE_PATTERN.match(archive.name)
    if not match:
        raise ImageError(f"{archive} is not a root filesystem archive named rootfs-SUITE-KEY.tar.gz; "
                         f"build one with `python -m melody_lab up` or melody_lab.rootfs.ensure_archive")
    return f"{BASE_REPOSITORY}:{match['suite']}-{match['key']}"


def import_base(daemon: Dockerd, archive: Path) -> str:
    """Import the root filesystem archive as the base image, unless it is there already."""
    tag = base_tag(archive)
    if image_exists(daemon, tag):
        logger.info("images: base %s reused", tag)
        return tag
    logger.info("images: importing %s as %s", archive, tag)
    daemon.docker("import", "--message", f"MELODY base from {archive.name}", str(archive), tag, timeout=300)
    return tag


def base_target(daemon: Dockerd, base: str) -> wheelhouses.Target:
    """Read the base image's Python, machine and glibc, which decide the wheels."""
    result = daemon.docker("run", "--rm", "--network", "none", base, "python3", "-c", PLATFORM_PROBE, timeout=120)
    return wheelhouses.target_from_fact(json.loads(result.stdout.decode()))


def service_tag(settings: dict, base: str, wheelhouse_id: str) -> str:
    recipe = json.dumps({"base": base, "wheelhouse": wheelhouse_id, "uid": SERVICE_UID,
                         "install_dir": settings["melody_install_dir"], "recipe": RECIPE_VERSION,
                         "folders": service_folders(settings)}, sort_keys=True)
    digest = hashlib.sha256(recipe.encode()).hexdigest()[:12]
    return f"{SERVICE_REPOSITORY}:{settings['melody_flwr_version']}-{digest}"


def service_folders(settings: dict) -> list[str]:
    """State and log folders that named volumes mount; the image gives them to the service user,
    and Docker copies that ownership into a new volume."""
    return [settings["melody_superlink_state_dir"], settings["melody_superlink_log_dir"],
            settings["melody_supernode_state_dir"]]


def build_script(plan: HostPlan) -> str:
    user = plan.settings["melody_service_user"]
    folders = " ".join(service_folders(plan.settings))
    return "\n".join([
        venv_install_script(plan),
        f"groupadd --system --gid {SERVICE_UID} {user}",
        f"useradd --system --uid {SERVICE_UID} --gid {SERVICE_UID} --no-create-home "
        f"--home-dir {plan.settings['melody_supernode_state_dir']} --shell /usr/sbin/nologin {user}",
        f"install -d -o {user} -g {user} -m 0750 {folders}",
        # Nothing in the image may need a network or a compiler later.
        "rm -rf /root/.cache /var/cache/apt/archives/*.deb",
    ])


def build(daemon: Dockerd, settings: dict, archive: Path) -> Images:
    """Import the base image and build the service image for `settings`, reusing what exists."""
    base = import_base(daemon, archive)
    target = base_target(daemon, base)
    cache_root = Path(settings["melody_wheelhouse_cache"]).resolve()
    built = wheelhouses.build(settings, target, cache_root)
    paths = host_paths(settings, built.wheelhouse_id)
    tag = service_tag(settings, base, built.wheelhouse_id)
    images = Images(base, tag, paths.venv, built.wheelhouse_id)
    if image_exists(daemon, tag):
        logger.info("images: service image %s reused", tag)
        return images

    # The same install the pyinfra deploy runs on a host, in a container
    # without a network that mounts the wheelhouse read-only.
    plan = HostPlan(ResolvedHost("image", "supernode", "image", settings), built, paths)
    builder = f"melody-build-{tag.split(':')[1]}"
    daemon.docker("rm", "--force", builder, check=False, timeout=300)
    logger.info("images: building %s from %s and wheelhouse %s", tag, base, built.wheelhouse_id)
    daemon.docker("run", "--name", builder, "--network", "none",
                  "--volume", f"{built.path}:{paths.wheelhouse}:ro",
                  base, "sh", "-c", build_script(plan), timeout=900)

    changes = [
        f"USER {SERVICE_UID}:{SERVICE_UID}",
        f"ENV PATH={paths.venv}/bin:/usr/local/bin:/usr/bin:/bin",
        "ENV FLWR_TELEMETRY_ENABLED=0",
        "ENV FLWR_DISABLE_UPDATE_CHECK=1",
        f"WORKDIR {settings['melody_supernode_state_dir']}",
        f'CMD ["{paths.venv}/bin/flower-supernode", "--help"]',
        f"LABEL org.melody.wheelhouse={built.wheelhouse_id} org.melody.base={base}",
    ]
    change_args = [argument for change in changes for argument in ("--change", change)]
    try:
        daemon.docker("commit", *change_args, builder, tag, timeout=600)
    finally:
        daemon.docker("rm", "--force", builder, check=False, timeout=300)
    logger.info("images: built %s", tag)
    return images
