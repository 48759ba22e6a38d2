"""Build the offline wheelhouse that the hosts install their venv from.

TRE hosts cannot reach a package index, so the operator's machine downloads
every wheel for the hosts' Python version and platform, and the deploy uploads
them. The wheelhouse is cached by the hash of what it was built from, and its
lock file pins each wheel by SHA-256 so the hosts install exactly these files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import sys
import threading
import tomllib
from dataclasses import dataclass
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

from . import local_wheels

logger = logging.getLogger(__name__)

APP_DIR = Path(__file__).resolve().parent.parent / "melody_app"
LOCK_FILE = "requirements.lock"
MANIFEST_FILE = "wheelhouse.json"

# Packages whose version the inventory pins; the app's own ranges for them are
# checked by pip against the pin.
PINNED_BY_SETTINGS = {"flwr", "torch"}

# pyinfra loads the deploy on every host at once (gevent greenlets), and hosts
# with the same target must share one build.
build_lock = threading.Lock()


class WheelhouseError(RuntimeError):
    """The wheelhouse could not be built on the operator's machine."""


@dataclass(frozen=True)
class Target:
    """What decides which wheels a host can install."""

    python: tuple[int, int]
    machine: str
    glibc: tuple[int, int]

    def pip_platform_args(self) -> list[str]:
        # pip matches manylinux tags exactly, so list every glibc level the
        # host can load, newest first, down to manylinux2014 (glibc 2.17).
        args = []
        for minor in range(self.glibc[1], 16, -1):
            args += ["--platform", f"manylinux_2_{minor}_{self.machine}"]
        args += ["--platform", f"manylinux2014_{self.machine}"]
        return args

    def pip_python_args(self) -> list[str]:
        version = f"{self.python[0]}{self.python[1]}"
        return ["--python-version", f"{self.python[0]}.{self.python[1]}",
                "--implementation", "cp", "--abi", f"cp{version}", "--abi", "abi3",
                "--abi", "none"]


@dataclass(frozen=True)
class Wheelhouse:
    """A built wheelhouse: its folder, id and the files to upload."""

    path: Path
    wheelhouse_id: str
    files: tuple[str, ...]


def target_from_fact(platform_fact: dict) -> Target:
    glibc_major, glibc_minor = (int(part) for part in platform_fact["libc"][1].split(".")[:2])
    return Target(
        python=tuple(platform_fact["python"]),
        machine=platform_fact["machine"],
        glibc=(glibc_major, glibc_minor),
    )


def app_requirements(app_dir: Path = APP_DIR) -> list[str]:
    """Return the app's runtime dependencies from its pyproject.toml."""
    with open(app_dir / "pyproject.toml", "rb") as handle:
        project = tomllib.load(handle)["project"]
    return list(project.get("dependencies", []))


def requirements(settings: dict, app_dir: Path = APP_DIR) -> list[str]:
    """Return the requirement lines for a host: the pinned flwr and torch, then the app's."""
    torch = f"torch=={settings['melody_torch_version']}"
    if settings["melody_torch_build"] == "cpu":
        torch += "+cpu"
    lines = [f"flwr=={settings['melody_flwr_version']}", torch]

    for line in app_requirements(app_dir):
        name = canonicalize_name(Requirement(line).name)
        if name not in PINNED_BY_SETTINGS:
            lines.append(line)
    return lines


def cache_key(lines: list[str], target: Target, extra_args: list[str]) -> str:
    recipe = json.dumps(
        {"requirements": lines, "target": [target.python, target.machine, target.glibc],
         "pip_args": extra_args},
        sort_keys=True,
    )
    return hashlib.sha256(recipe.encode()).hexdigest()[:16]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_lock(folder: Path) -> tuple[str, ...]:
    """Write the hash-pinned lock file and manifest; return the wheel names."""
    wheels = sorted(path.name for path in folder.glob("*.whl"))
    lock_lines = []
    manifest = {}
    for wheel in wheels:
        name, version, _, _ = parse_wheel_filename(wheel)
        digest = sha256_file(folder / wheel)
        lock_lines.append(f"{name}=={version} --hash=sha256:{digest}")
        manifest[wheel] = digest
    (folder / LOCK_FILE).write_text("\n".join(lock_lines) + "\n")
    # The manifest is written last: its presence marks a complete build.
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return tuple(wheels)


def wheelhouse_id(folder: Path) -> str:
    """Hash of the wheels' names and contents, which names the venv on the hosts."""
    manifest = (folder / MANIFEST_FILE).read_bytes()
    return hashlib.sha256(manifest).hexdigest()[:12]


def check_torch_build(wheels: tuple[str, ...], build: str) -> None:
    torch = [wheel for wheel in wheels if wheel.startswith("torch-")]
    if build == "cuda" and any("+cpu" in wheel for wheel in torch):
        raise WheelhouseError(
            f"melody_torch_build is 'cuda' but pip chose the CPU wheel {torch[0]}; "
            f"remove local CPU wheels from pip's find-links for this build"
        )


def build(settings: dict, target: Target, cache_root: Path, app_dir: Path = APP_DIR) -> Wheelhouse:
    """Build the wheelhouse for one target, or reuse the cached one."""
    lines = requirements(settings, app_dir)
    extra_args = list(settings["melody_pip_download_args"])
    problem = local_wheels.target_problem(target)
    if problem is not None:
        raise WheelhouseError(problem)
    folder = cache_root / cache_key(lines + local_wheels.recipe(), target, extra_args)

    with build_lock:
        if (folder / MANIFEST_FILE).exists():
            wheels = tuple(sorted(path.name for path in folder.glob("*.whl")))
            logger.info("wheelhouse %s reused (%d wheels)", folder, len(wheels))
            return Wheelhouse(folder, wheelhouse_id(folder), wheels)

        folder.mkdir(parents=True, exist_ok=True)
        (folder / "requirements.in").write_text("\n".join(lines) + "\n")
        command = [
            sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:",
            "--dest", str(folder), *target.pip_python_args(), *target.pip_platform_args(),
            *extra_args, "--requirement", str(folder / "requirements.in"),
        ]
        logger.info("wheelhouse build started in %s for %s", folder, target)
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            # Keep only pip's own error lines, not its index warnings.
            errors = [line for line in result.stderr.splitlines() if "ERROR" in line]
            raise WheelhouseError(
                f"pip download failed for {', '.join(lines)} "
                f"(Python {target.python[0]}.{target.python[1]}, {target.machine}): "
                + ("; ".join(errors) or result.stderr[-2000:])
                + ". Check melody_flwr_version, melody_torch_version and melody_pip_download_args."
            )

        try:
            local_wheels.build(folder)
        except RuntimeError as error:
            raise WheelhouseError(str(error)) from error

        wheels = write_lock(folder)
        check_torch_build(wheels, settings["melody_torch_build"])
        logger.info("wheelhouse build finished: %d wheels in %s", len(wheels), folder)
        return Wheelhouse(folder, wheelhouse_id(folder), wheels)
