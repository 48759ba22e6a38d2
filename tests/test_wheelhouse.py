"""Wheelhouse requirements, target platform tags and the hash-pinned lock file."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import ensurepip
import pytest

from melody_deploy import wheelhouse
from melody_deploy.preflight import HostSpec, validate_inventory

# Real wheels that ship with CPython, so the lock file is built from real files.
BUNDLED_WHEELS = Path(ensurepip.__file__).parent / "_bundled"


def settings(**data) -> dict:
    return validate_inventory([HostSpec("link", ("superlink",), data)]).superlink.settings


def test_requirements_pin_flwr_and_cpu_torch():
    lines = wheelhouse.requirements(settings())

    assert lines[:2] == ["flwr==1.42.0", "torch==2.13.0+cpu"]


def test_requirements_cuda_torch_has_no_local_label():
    lines = wheelhouse.requirements(settings(melody_torch_build="cuda", melody_torch_version="2.14.1"))

    assert lines[1] == "torch==2.14.1"


def test_requirements_keep_app_dependencies():
    lines = wheelhouse.requirements(settings())
    app_names = {line.split(">")[0].split("=")[0].split("<")[0] for line in lines[2:]}

    assert {"numpy", "pillow"} <= app_names
    # flwr and torch come from the settings' pins, not the app's ranges.
    assert "flwr" not in app_names
    assert "torch" not in app_names


def test_target_from_platform_fact():
    fact = {"python": [3, 11], "machine": "x86_64", "libc": ["glibc", "2.36"], "venv": True}

    target = wheelhouse.target_from_fact(fact)

    assert target == wheelhouse.Target(python=(3, 11), machine="x86_64", glibc=(2, 36))


def test_platform_tags_cover_every_glibc_level():
    target = wheelhouse.Target(python=(3, 11), machine="aarch64", glibc=(2, 31))

    args = target.pip_platform_args()
    platforms = args[1::2]

    assert platforms[0] == "manylinux_2_31_aarch64"
    assert platforms[-2] == "manylinux_2_17_aarch64"
    assert platforms[-1] == "manylinux2014_aarch64"
    assert len(platforms) == 31 - 17 + 2
    assert set(args[0::2]) == {"--platform"}


def test_cache_key_changes_with_target():
    lines = ["flwr==1.42.0"]
    debian = wheelhouse.Target((3, 11), "x86_64", (2, 36))
    ubuntu = wheelhouse.Target((3, 12), "x86_64", (2, 39))

    assert wheelhouse.cache_key(lines, debian, []) == wheelhouse.cache_key(lines, debian, [])
    assert wheelhouse.cache_key(lines, debian, []) != wheelhouse.cache_key(lines, ubuntu, [])
    assert wheelhouse.cache_key(lines, debian, []) != wheelhouse.cache_key(lines, debian, ["--pre"])


def test_lock_file_pins_each_wheel_by_hash(tmp_path):
    for wheel in BUNDLED_WHEELS.glob("*.whl"):
        shutil.copy(wheel, tmp_path)

    wheels = wheelhouse.write_lock(tmp_path)
    lock = (tmp_path / wheelhouse.LOCK_FILE).read_text().splitlines()

    assert len(wheels) == 2
    for wheel, line in zip(wheels, lock):
        digest = hashlib.sha256((tmp_path / wheel).read_bytes()).hexdigest()
        name, version = wheel.split("-")[:2]
        assert line == f"{name}=={version} --hash=sha256:{digest}"


def test_wheelhouse_id_follows_content(tmp_path):
    first = tmp_path / "first"
    second = tmp_path / "second"
    for folder in (first, second):
        folder.mkdir()
        shutil.copy(next(BUNDLED_WHEELS.glob("pip-*.whl")), folder)
    (second / "extra-1.0-py3-none-any.whl").write_bytes(b"not the same content")
    wheelhouse.write_lock(first)
    wheelhouse.write_lock(second)

    assert wheelhouse.wheelhouse_id(first) != wheelhouse.wheelhouse_id(second)
    assert len(wheelhouse.wheelhouse_id(first)) == 12


def test_cuda_build_rejects_cpu_wheel():
    with pytest.raises(wheelhouse.WheelhouseError, match="pip chose the CPU wheel"):
        wheelhouse.check_torch_build(("torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl",), "cuda")
