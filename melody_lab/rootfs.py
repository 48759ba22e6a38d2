"""Build, cache and unpack the Debian root filesystem that every lab host boots."""

import ast
import hashlib
import inspect
import json
import logging
import shutil
import subprocess
import time
from pathlib import Path

log = logging.getLogger(__name__)

SUITE = "bookworm"
VARIANT = "minbase"

# Packages a lab host needs beyond minbase: systemd as init, sshd for pyinfra,
# Python with venv for the deploy, and small network tools for checks.
# nginx is there because the SuperLink host of a TRE installs it from its own
# apt mirror, which the lab hosts have no route to.
# Compilers stay out because the deploy must not build anything on a host.
PACKAGES = (
    "ca-certificates",
    "dbus",
    "iproute2",
    "iputils-ping",
    "netbase",
    "nginx",
    "openssh-server",
    "procps",
    "python3",
    "python3-venv",
    "sudo",
    "systemd",
    "systemd-sysv",
)

APT_SOURCE_FILES = (Path("/etc/apt/sources.list"), Path("/etc/apt/sources.list.d"))

# Runs at a host's first boot when the lab has not placed a host key, so the
# image itself ships no host key that every host would share.
SSH_KEYGEN_UNIT = """\
[Unit]
Description=Generate the SSH host keys missing on this host
ConditionPathExists=!/etc/ssh/ssh_host_ed25519_key
Before=ssh.service

[Service]
Type=oneshot
ExecStart=/usr/bin/ssh-keygen -A

[Install]
WantedBy=ssh.service
"""


class RootfsError(RuntimeError):
    """The root filesystem could not be built or unpacked."""


def find_debian_mirror() -> str:
    """Return the Debian mirror that this machine's apt uses for its main suite.

    Reads one-line `deb URI SUITE ...` entries and deb822 `.sources` files.
    Security and update suites are skipped because debootstrap needs the
    main archive.
    """
    candidates = []
    for source in APT_SOURCE_FILES:
        files = sorted(source.glob("*")) if source.is_dir() else [source]
        for path in files:
            if path.is_file() and path.suffix in (".list", ".sources"):
                candidates.extend(_parse_apt_file(path.read_text()))

    for uri, suites in candidates:
        if any(suite in (SUITE, "stable") for suite in suites):
            return uri
    raise RootfsError(
        f"no apt source for Debian {SUITE} found in /etc/apt; "
        "pass the Debian mirror URL with --mirror"
    )


def _parse_apt_file(text: str) -> list[tuple[str, list[str]]]:
    """Return (uri, suites) pairs from a sources.list or deb822 .sources text."""
    entries = []

    # One-line format: "deb [options] URI SUITE COMPONENT..."
    for line in text.splitlines():
        words = line.split("#", 1)[0].split()
        if words[:1] == ["deb"]:
            words = [word for word in words[1:] if not word.startswith("[")]
            if len(words) >= 2:
                entries.append((words[0], [words[1]]))

    # deb822 format: paragraphs of "Field: value" lines.
    for paragraph in text.split("\n\n"):
        fields = {}
        for line in paragraph.splitlines():
            if ":" in line and not line.startswith(("#", " ")):
                key, value = line.split(":", 1)
                fields[key.strip().lower()] = value.strip()
        if "deb" in fields.get("types", "").split() and "uris" in fields:
            entries.append((fields["uris"].split()[0], fields.get("suites", "").split()))
    return entries


def customize_image(root: Path) -> None:
    """Turn a fresh debootstrap tree into an image that boots many distinct hosts."""
    # Each host must get its own SSH host keys and machine id, so the image
    # ships none: an empty /etc/machine-id makes systemd create one at boot.
    for key in (root / "etc/ssh").glob("ssh_host_*"):
        key.unlink()
    (root / "etc/machine-id").write_text("")
    dbus_machine_id = root / "var/lib/dbus/machine-id"
    if dbus_machine_id.is_file() and not dbus_machine_id.is_symlink():
        dbus_machine_id.unlink()

    # debootstrap copies the build machine's name and resolver. A lab host has
    # no route to that resolver, so it gets none.
    (root / "etc/hostname").write_text("localhost\n")
    resolv_conf = root / "etc/resolv.conf"
    resolv_conf.unlink(missing_ok=True)
    resolv_conf.write_text("# Lab hosts resolve names from /etc/hosts only.\n")

    (root / "etc/systemd/system/ssh-keygen-missing.service").write_text(SSH_KEYGEN_UNIT)
    _systemctl(root, "enable", "systemd-networkd.service", "ssh.service", "ssh-keygen-missing.service")

    # Hosts have no route to a Debian mirror, so apt's daily runs could only
    # fail and mark the host degraded.
    _systemctl(root, "disable", "apt-daily.timer", "apt-daily-upgrade.timer")

    # Package lists and downloaded .deb files are useless offline.
    for leftover in (root / "var/lib/apt/lists").glob("*_*"):
        leftover.unlink()
    for leftover in (root / "var/cache/apt/archives").glob("*.deb"):
        leftover.unlink()


def _systemctl(root: Path, *arguments: str) -> None:
    subprocess.run(["systemctl", f"--root={root}", *arguments], check=True, capture_output=True, text=True)


def _code_of(function) -> str:
    """Return the function's syntax tree as text, so editing a comment keeps the key."""
    return ast.dump(ast.parse(inspect.getsource(function)))


def recipe_key() -> str:
    """Return a short hash of everything that decides the image's content."""
    recipe = {
        "suite": SUITE,
        "variant": VARIANT,
        "packages": sorted(PACKAGES),
        "customize": [_code_of(customize_image), _code_of(_systemctl)],
        "ssh_keygen_unit": SSH_KEYGEN_UNIT,
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def ensure_archive(cache: Path, mirror: str | None = None) -> Path:
    """Return the cached rootfs archive for the current recipe, building it if missing."""
    archive = cache / f"rootfs-{SUITE}-{recipe_key()}.tar.gz"
    if archive.is_file():
        log.info("rootfs: using cached %s", archive)
        return archive

    cache.mkdir(parents=True, exist_ok=True)
    mirror = mirror or find_debian_mirror()
    build_root = cache / f"build-{recipe_key()}"
    build_log = cache / f"build-{recipe_key()}.log"
    if build_root.exists():
        log.info("rootfs: removing the unfinished build %s", build_root)
        remove_tree(build_root)

    started = time.monotonic()
    log.info("rootfs: running debootstrap %s from %s (log: %s)", SUITE, mirror, build_log)
    with build_log.open("w") as output:
        result = subprocess.run(
            ["debootstrap", f"--variant={VARIANT}", "--components=main",
             f"--include={','.join(PACKAGES)}", SUITE, str(build_root), mirror],
            stdout=output, stderr=subprocess.STDOUT,
        )
    if result.returncode != 0:
        tail = build_log.read_text()[-2000:]
        raise RootfsError(f"debootstrap failed with exit code {result.returncode}:\n{tail}")
    customize_image(build_root)
    log.info("rootfs: built in %.1f s", time.monotonic() - started)

    started = time.monotonic()
    partial = archive.with_name(archive.name + ".partial")
    subprocess.run(
        ["tar", "--numeric-owner", "--xattrs", "--xattrs-include=*",
         "-czf", str(partial), "-C", str(build_root), "."],
        check=True,
    )
    partial.rename(archive)
    remove_tree(build_root)
    for outdated in [*cache.glob(f"rootfs-{SUITE}-*.tar.gz"), *cache.glob("build-*.log")]:
        if outdated not in (archive, build_log):
            log.info("rootfs: deleting %s, made by an older recipe", outdated)
            outdated.unlink()
    log.info("rootfs: archived to %s (%.0f MB) in %.1f s",
             archive, archive.stat().st_size / 1e6, time.monotonic() - started)
    return archive


def unpack(archive: Path, target: Path) -> None:
    """Unpack a rootfs archive into an empty folder, keeping owners and file capabilities."""
    started = time.monotonic()
    target.mkdir(parents=True)
    subprocess.run(
        ["tar", "--numeric-owner", "--xattrs", "--xattrs-include=*",
         "-xzf", str(archive), "-C", str(target)],
        check=True,
    )
    log.info("rootfs: unpacked to %s in %.1f s", target, time.monotonic() - started)


def remove_tree(path: Path) -> None:
    """Delete a tree, raising RootfsError while something is still mounted inside it."""
    mounted = [point for point in mount_points() if point == path or path in point.parents]
    if mounted:
        raise RootfsError(f"cannot delete {path}: still mounted: {', '.join(map(str, mounted))}")
    shutil.rmtree(path)


def mount_points() -> list[Path]:
    """Return every mount point of this mount namespace."""
    points = []
    with open("/proc/self/mountinfo") as mountinfo:
        for line in mountinfo:
            # Field 5 is the mount point, with spaces written as \040.
            point = line.split()[4].replace("\\040", " ")
            points.append(Path(point))
    return points
