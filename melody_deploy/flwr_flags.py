"""Flags that a flwr release's own flower-superlink and flower-supernode accept.

Flower's command line changes between minor releases, so the deploy does not
keep a hand-written list per version. It installs the release into a probe
venv on the operator's machine, reads each command's `--help`, and caches the
result by version. The probe venv is removed once its flags are read.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from .errors import DeployError

log = logging.getLogger(__name__)

COMMANDS = ("flower-superlink", "flower-supernode")

# An option in argparse help starts a line (after indentation) or follows `[`
# in the usage block; continuation lines of a description never start so.
OPTION_PATTERN = re.compile(r"(?:^\s+|\[)(--[a-z][a-z0-9-]*)", re.MULTILINE)

# Flower marks a flag that stays only so that old command lines keep parsing
# with the word "deprecated" in its help.
DEPRECATED_PATTERN = re.compile(r"deprecated", re.IGNORECASE)


@dataclass(frozen=True)
class CommandFlags:
    """Options one command accepts, and those of them its help calls deprecated."""

    accepted: frozenset[str]
    deprecated: frozenset[str]

    def usable(self, flag: str) -> bool:
        return flag in self.accepted and flag not in self.deprecated


@dataclass(frozen=True)
class FlwrFlags:
    """Flags of flower-superlink and flower-supernode in one flwr release."""

    version: str
    superlink: CommandFlags
    supernode: CommandFlags


def parse_help(text: str) -> CommandFlags:
    """Return the options in an argparse `--help` text.

    Example: "usage: x [--insecure] [--database DATABASE]" gives
    accepted {"--insecure", "--database"}.
    """
    accepted = set(OPTION_PATTERN.findall(text))
    accepted.discard("--help")
    deprecated = set()

    # The options section lists each option on a line of its own, followed by
    # its help until the next option line.
    sections = re.split(r"^\s{2}(?=--[a-z])", text, flags=re.MULTILINE)
    for section in sections[1:]:
        flag = section.split()[0].rstrip(",")
        if DEPRECATED_PATTERN.search(section):
            deprecated.add(flag)
    return CommandFlags(frozenset(accepted), frozenset(deprecated & accepted))


def _read_help(bin_dir: Path, command: str) -> str:
    # FLWR_HOME points at a throw-away folder so that `--help` cannot touch
    # the operator's own Flower configuration.
    with tempfile.TemporaryDirectory(prefix="melody-flwr-home-") as home:
        environment = {**os.environ, "FLWR_HOME": home, "FLWR_TELEMETRY_ENABLED": "0",
                       "FLWR_DISABLE_UPDATE_CHECK": "1"}
        result = subprocess.run([str(bin_dir / command), "--help"], capture_output=True, text=True,
                                env=environment, timeout=120, check=False)
    if result.returncode != 0:
        raise DeployError(f"{bin_dir / command} --help failed with exit code {result.returncode}: "
                          f"{result.stderr.strip()[-500:]}")
    return result.stdout


def _installed_version() -> str | None:
    try:
        return metadata.version("flwr")
    except metadata.PackageNotFoundError:
        return None


def _probe_venv(version: str, folder: Path, wheelhouse: Path | None, pip_args: tuple[str, ...]) -> Path:
    """Install flwr `version` into a new venv at `folder` and return its bin folder.

    From `wheelhouse` when given (offline, exactly the wheels the hosts get),
    else from the package index with the extra `pip_args`.
    """
    log.info("flwr %s: installing into a probe venv at %s to read its flags", version, folder)
    subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True)
    pip = [str(folder / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    if wheelhouse is not None:
        pip += ["--no-index", "--find-links", str(wheelhouse)]
    else:
        pip += list(pip_args)
    result = subprocess.run([*pip, f"flwr=={version}"], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        source = f"the wheelhouse {wheelhouse}" if wheelhouse is not None else "your package index"
        raise DeployError(f"failed to install flwr=={version} from {source} to read its flags: "
                          f"{result.stderr.strip()[-800:]}; check melody_flwr_version and "
                          f"that this machine reaches {source}")
    return folder / "bin"


def _to_json(flags: FlwrFlags) -> dict:
    return {
        "version": flags.version,
        **{name: {"accepted": sorted(command.accepted), "deprecated": sorted(command.deprecated)}
           for name, command in (("superlink", flags.superlink), ("supernode", flags.supernode))},
    }


def _from_json(document: dict) -> FlwrFlags:
    def command(name: str) -> CommandFlags:
        return CommandFlags(frozenset(document[name]["accepted"]), frozenset(document[name]["deprecated"]))

    return FlwrFlags(document["version"], command("superlink"), command("supernode"))


def probe(version: str, cache_dir: Path, wheelhouse: Path | None = None, pip_args: tuple[str, ...] = ()) -> FlwrFlags:
    """Return the flags of flwr `version`, read from the release itself.

    Reuses `cache_dir/flags-VERSION.json` when present. When this machine's
    own flwr has that version, its commands are read directly. Otherwise the
    release is installed into a probe venv that is removed afterwards: from
    `wheelhouse` when given, so that a locally built flwr is read as it is,
    and then the cache file also names the wheelhouse's folder.
    """
    suffix = f"-{wheelhouse.name}" if wheelhouse is not None else ""
    cache_file = cache_dir / f"flags-{version}{suffix}.json"
    if cache_file.exists():
        return _from_json(json.loads(cache_file.read_text()))

    cache_dir.mkdir(parents=True, exist_ok=True)
    probe_dir = None
    if _installed_version() == version:
        bin_dir = Path(sys.executable).parent
    else:
        probe_dir = Path(tempfile.mkdtemp(prefix=f"flwr-{version}-", dir=cache_dir))
        bin_dir = _probe_venv(version, probe_dir, wheelhouse, pip_args)

    try:
        helps = {command: _read_help(bin_dir, command) for command in COMMANDS}
    finally:
        if probe_dir is not None:
            shutil.rmtree(probe_dir, ignore_errors=True)

    flags = FlwrFlags(version, parse_help(helps["flower-superlink"]), parse_help(helps["flower-supernode"]))
    if not flags.superlink.accepted or not flags.supernode.accepted:
        raise DeployError(f"flwr {version}: no flags found in the --help of {', '.join(COMMANDS)}")

    # Written through a temporary file so that a crash never leaves half a cache entry.
    partial = cache_file.with_suffix(".partial")
    partial.write_text(json.dumps(_to_json(flags), indent=2) + "\n")
    partial.replace(cache_file)
    log.info("flwr %s: read %d superlink and %d supernode flags", version,
             len(flags.superlink.accepted), len(flags.supernode.accepted))
    return flags
