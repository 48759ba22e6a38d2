"""flwr installs that the version tests build: a researcher CLI venv and a broken release."""

from __future__ import annotations

import base64
import hashlib
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WHEELHOUSE_CACHE = REPO / ".cache" / "wheelhouse"

# Appended to flwr's SuperLink command module: `--help` still works, so the
# deploy can read the flags, but every real start exits with an error.
BREAKAGE = '''

_melody_working_flower_superlink = flower_superlink


def flower_superlink():
    import sys
    if "--help" in sys.argv or "-h" in sys.argv:
        return _melody_working_flower_superlink()
    raise SystemExit("deliberately broken flwr build of the MELODY rollback test")
'''


def wheelhouse_with(version: str) -> Path:
    """Return the newest complete wheelhouse in the lab's cache that contains flwr `version`."""
    candidates = [wheel.parent for wheel in WHEELHOUSE_CACHE.glob(f"*/flwr-{version}-*.whl")
                  if (wheel.parent / "wheelhouse.json").exists()]
    if not candidates:
        raise FileNotFoundError(f"no wheelhouse with flwr {version} in {WHEELHOUSE_CACHE}; deploy it first")
    return max(candidates, key=lambda folder: (folder / "wheelhouse.json").stat().st_mtime)


def researcher_cli(version: str) -> Path:
    """Return the `flwr` of a venv with flwr `version`, installed offline from its wheelhouse.

    The venv lives in .cache, named after the wheelhouse, so a run reuses it.
    """
    wheelhouse = wheelhouse_with(version)
    venv = REPO / ".cache" / "flwr-cli" / f"{version}-{wheelhouse.name}"
    flwr = venv / "bin" / "flwr"
    if flwr.exists():
        return flwr
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                    "--no-index", "--find-links", str(wheelhouse), f"flwr=={version}"], check=True)
    return flwr


def record_line(name: str, content: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(content).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(content)}"


def broken_flwr_wheel(source: Path, version: str, folder: Path) -> Path:
    """Copy the flwr wheel `source` as release `version` whose SuperLink exits on every start."""
    old_version = source.name.split("-")[1]
    target = folder / source.name.replace(f"-{old_version}-", f"-{version}-")
    old_info, new_info = f"flwr-{old_version}.dist-info/", f"flwr-{version}.dist-info/"
    records = []
    with zipfile.ZipFile(source) as original, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as broken:
        for item in original.infolist():
            name = item.filename.replace(old_info, new_info)
            if name == f"{new_info}RECORD":
                continue
            content = original.read(item)
            if name == "flwr/superlink/cli/__init__.py":
                content += BREAKAGE.encode()
            if name == f"{new_info}METADATA":
                content = content.replace(f"\nVersion: {old_version}\n".encode(), f"\nVersion: {version}\n".encode())
            broken.writestr(name, content)
            records.append(record_line(name, content))
        records.append(f"{new_info}RECORD,,")
        broken.writestr(f"{new_info}RECORD", "\n".join(records) + "\n")
    return target
