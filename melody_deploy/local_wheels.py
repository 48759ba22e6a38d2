"""Wheels built on the operator's machine for the hosts: melody-audit and systemd-python.

The SuperNode's egress record and sd_notify need systemd-python, which is
published only as source, and this project's own melody_audit package.
Both are built here into the wheelhouse, so the hosts still install
offline from hash-pinned files.

systemd-python is a C extension compiled against this machine's Python and
libsystemd. Its wheel fits a host only when both run the same Python
major.minor on the same CPU architecture, and the host's glibc is at least
as new as this machine's. The check below raises before any host changes
when that does not hold.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import melody_audit

SYSTEMD_PYTHON = "systemd-python==235"
AUDIT_SOURCE = Path(melody_audit.__file__).resolve().parent
# Fixed wheel timestamps, so the same source gives the same wheel hash.
SOURCE_DATE_EPOCH = "1700000000"

AUDIT_PYPROJECT = """\
[project]
name = "melody-audit"
version = "{version}"
description = "Egress record and systemd notifications of a MELODY SuperNode"
requires-python = ">=3.10"

[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[tool.setuptools]
packages = ["melody_audit"]
"""


def operator_glibc() -> tuple[int, int]:
    name, release = platform.libc_ver()
    if name != "glibc" or not release:
        return (0, 0)
    major, minor = release.split(".")[:2]
    return int(major), int(minor)


def target_problem(target) -> str | None:
    """Return why the operator's machine cannot build systemd-python for `target`, or None."""
    here_python = tuple(sys.version_info[:2])
    if here_python != tuple(target.python):
        return (
            f"systemd-python must be compiled for the hosts' Python "
            f"{target.python[0]}.{target.python[1]}, but pyinfra runs on Python "
            f"{here_python[0]}.{here_python[1]}; recreate .venv with that Python "
            f"(PYTHON=python{target.python[0]}.{target.python[1]} bash scripts/setup.sh)"
        )
    if platform.machine() != target.machine:
        return (
            f"systemd-python must be compiled for the hosts' CPU architecture {target.machine}, "
            f"but this machine is {platform.machine()}; deploy from a {target.machine} machine"
        )
    here_glibc = operator_glibc()
    if here_glibc > tuple(target.glibc):
        return (
            f"this machine's glibc {here_glibc[0]}.{here_glibc[1]} is newer than the hosts' "
            f"{target.glibc[0]}.{target.glibc[1]}, so a systemd-python compiled here may not load "
            f"there; deploy from a machine with the hosts' distribution release"
        )
    return None


def recipe() -> list[str]:
    """Lines that identify what the local wheels are built from, for the wheelhouse cache key."""
    digest = hashlib.sha256()
    for path in sorted(AUDIT_SOURCE.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return [SYSTEMD_PYTHON, f"melody-audit=={melody_audit.__version__} source sha256:{digest.hexdigest()}"]


def run_pip(args: list[str], wheel_name: str) -> None:
    environment = dict(os.environ, SOURCE_DATE_EPOCH=SOURCE_DATE_EPOCH)
    result = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True, env=environment)
    if result.returncode != 0:
        raise RuntimeError(f"building the {wheel_name} wheel failed: {result.stderr[-2000:]}")


def build(folder: Path) -> None:
    """Build the melody-audit and systemd-python wheels into `folder`.

    Raise RuntimeError naming the wheel and pip's error when a build fails;
    systemd-python needs gcc, pkg-config, libsystemd-dev and the Python
    headers, which scripts/setup.sh installs.
    """
    run_pip(
        ["wheel", "--quiet", "--no-deps", "--no-binary", ":all:", "--wheel-dir", str(folder), SYSTEMD_PYTHON],
        "systemd-python (needs gcc, pkg-config, libsystemd-dev and python3-dev: run scripts/setup.sh)",
    )
    with tempfile.TemporaryDirectory(prefix="melody-audit-") as temporary:
        project = Path(temporary)
        (project / "pyproject.toml").write_text(AUDIT_PYPROJECT.format(version=melody_audit.__version__))
        shutil.copytree(AUDIT_SOURCE, project / "melody_audit", ignore=shutil.ignore_patterns("__pycache__"))
        run_pip(
            ["wheel", "--quiet", "--no-deps", "--no-build-isolation", "--wheel-dir", str(folder), str(project)],
            "melody-audit",
        )
