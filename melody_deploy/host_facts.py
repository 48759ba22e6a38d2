"""Facts read from each host during preflight, and the checks on them."""

from __future__ import annotations

import json

from pyinfra.api import FactBase
from pyinfra.facts.files import Directory
from pyinfra.facts.server import LinuxDistribution

from .settings import SUPERNODE

# Distributions whose systemd and Python the units and the wheelhouse suit.
# NOTE: the lab tests Debian 12 only; the others are accepted on the strength
# of their systemd (249 or later) and Python (3.10 or later).
SUPPORTED_SYSTEMS = {
    ("Debian", 12),
    ("Debian", 13),
    ("Ubuntu", 22),
    ("Ubuntu", 24),
}
MIN_PYTHON = (3, 10)

PLATFORM_SCRIPT = (
    "import json, platform, sys, importlib.util as u; "
    "print(json.dumps({"
    "'python': list(sys.version_info[:2]), "
    "'machine': platform.machine(), "
    "'libc': platform.libc_ver(), "
    "'venv': u.find_spec('venv') is not None and u.find_spec('ensurepip') is not None}))"
)


class PythonPlatform(FactBase):
    """
    Python version, CPU architecture and C library of the host's `python3`,
    which decide the wheels the host can install.

    .. code:: python

        {"python": [3, 11], "machine": "x86_64", "libc": ["glibc", "2.36"], "venv": true}
    """

    def requires_command(self) -> str:
        return "python3"

    def command(self) -> str:
        return f'python3 -c "{PLATFORM_SCRIPT}"'

    def process(self, output):
        return json.loads("".join(output))


class SystemdIsInit(FactBase):
    """
    Whether systemd runs as PID 1 (the folder /run/systemd/system exists).

    .. code:: python

        True
    """

    def command(self) -> str:
        return "test -d /run/systemd/system && echo yes || echo no"

    def process(self, output):
        return "".join(output).strip() == "yes"


def check_host(host, role: str, settings: dict) -> list[str]:
    """Read the host's facts and return one problem line per failed check."""
    problems: list[str] = []
    name = host.name

    distribution = host.get_fact(LinuxDistribution) or {}
    system = (distribution.get("name"), distribution.get("major"))
    if system not in SUPPORTED_SYSTEMS:
        supported = ", ".join(f"{n} {v}" for n, v in sorted(SUPPORTED_SYSTEMS))
        problems.append(
            f"host {name}: operating system {system[0]} {system[1]} is not supported; "
            f"use one of {supported}"
        )

    if not host.get_fact(SystemdIsInit):
        problems.append(f"host {name}: systemd is not PID 1; the services need a systemd host")

    platform = host.get_fact(PythonPlatform)
    if platform is None:
        problems.append(f"host {name}: python3 is not installed; install the distribution's python3")
    else:
        if tuple(platform["python"]) < MIN_PYTHON:
            version = ".".join(str(part) for part in platform["python"])
            problems.append(
                f"host {name}: python3 is {version}; the venv needs Python "
                f"{MIN_PYTHON[0]}.{MIN_PYTHON[1]} or later"
            )
        if platform["libc"][0] != "glibc":
            problems.append(
                f"host {name}: C library {platform['libc'][0] or 'unknown'} is not glibc; "
                f"the wheelhouse holds manylinux wheels, which need glibc"
            )
        if not platform["venv"]:
            problems.append(
                f"host {name}: python3 cannot create venvs; install the python3-venv package"
            )

    if role == SUPERNODE:
        data_dir = settings["melody_data_dir"]
        if not host.get_fact(Directory, path=data_dir):
            problems.append(
                f"host {name}: setting 'melody_data_dir' = {data_dir!r} does not exist on the "
                f"host or is not a folder; export the site's images there or fix the path"
            )
    return problems
