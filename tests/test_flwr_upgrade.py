"""Lockstep preflight across hosts, bad version input, and the retirement of old venvs."""

from __future__ import annotations

import subprocess

import pytest

from melody_deploy.errors import PreflightError
from melody_deploy.preflight import HostSpec, validate_inventory
from melody_deploy.researcher import cli_version_mismatch
from melody_deploy.upgrade import retire_script


def specs(link: dict, site_a: dict, site_b: dict | None = None) -> list[HostSpec]:
    return [
        HostSpec("link", ("superlink",), link),
        HostSpec("site-a", ("supernodes",), {"melody_partition_id": 0, "melody_data_dir": "/srv/a", **site_a}),
        HostSpec("site-b", ("supernodes",), {"melody_partition_id": 1, "melody_data_dir": "/srv/b",
                                             **(site_b or {})}),
    ]


def problems(host_specs: list[HostSpec]) -> str:
    with pytest.raises(PreflightError) as raised:
        validate_inventory(host_specs)
    return str(raised.value)


def test_lockstep_names_hosts_on_each_minor():
    message = problems(specs({"melody_flwr_version": "1.27.0"}, {}))

    assert "setting 'melody_flwr_version' differs across the federation" in message
    assert "1.27 on link" in message
    assert "1.42 on site-a, site-b" in message
    assert "melody_flwr_staged_upgrade = True on every host" in message


def test_lockstep_same_minor_other_patch_passes():
    federation = validate_inventory(specs({"melody_flwr_version": "1.42.1"}, {}))

    assert federation.superlink.settings["melody_flwr_version"] == "1.42.1"


def test_staged_upgrade_on_every_host_passes(caplog):
    staged = {"melody_flwr_staged_upgrade": True}

    federation = validate_inventory(specs({**staged, "melody_flwr_version": "1.42.0"},
                                          {**staged, "melody_flwr_version": "1.27.0"}, staged))

    assert federation.supernodes[0].settings["melody_flwr_version"] == "1.27.0"
    assert "staged flwr upgrade" in caplog.text
    assert "1.27 on site-a" in caplog.text


def test_staged_upgrade_on_some_hosts_names_the_others():
    staged = {"melody_flwr_staged_upgrade": True}

    message = problems(specs({**staged, "melody_flwr_version": "1.42.0"},
                             {**staged, "melody_flwr_version": "1.27.0"}))

    assert "differs across the federation" in message
    assert "on the other hosts too (site-b)" in message


@pytest.mark.parametrize(("version", "fragment"), [
    ("1.42", "'1.42' is not a flwr release of the form X.Y.Z"),
    ("v1.42.0", "'v1.42.0' is not a flwr release of the form X.Y.Z"),
    ("1.26.0", "'1.26.0' is older than flwr 1.27.0"),
])
def test_bad_version_named_before_changes(version, fragment):
    message = problems(specs({"melody_flwr_version": version}, {"melody_flwr_version": version},
                             {"melody_flwr_version": version}))

    assert f"host link: setting 'melody_flwr_version' = {fragment}" in message
    assert "no host was changed" in message


def test_version_not_a_string_named():
    message = problems(specs({"melody_flwr_version": 1.42}, {}))

    assert "host link: setting 'melody_flwr_version' = 1.42 is a float" in message


@pytest.mark.parametrize("value", [0, -1])
def test_retire_after_below_one_rejected(value):
    message = problems(specs({"melody_venv_retire_after": value}, {}))

    assert f"setting 'melody_venv_retire_after' = {value} must be 1 or more" in message


def venv_tree(tmp_path, names: list[str]) -> dict:
    install_dir = tmp_path / "opt"
    for name in names:
        (install_dir / "venvs" / name / "bin").mkdir(parents=True)
        (install_dir / "wheelhouses" / name.rsplit("-", 1)[1]).mkdir(parents=True)
    return {"melody_install_dir": str(install_dir), "melody_venv_retire_after": 2}


def run_retire(settings: dict, previous: str, current: str) -> str:
    venvs = f"{settings['melody_install_dir']}/venvs"
    result = subprocess.run(["python3", "-c", retire_script(settings, "melody-test.service", f"{venvs}/{previous}",
                                                            f"{venvs}/{current}")],
                            capture_output=True, text=True, check=True)
    return result.stdout


def test_retire_keeps_rollback_target_then_retires(tmp_path):
    names = ["flwr-1.27.0-aaaaaaaaaaaa", "flwr-1.42.0-bbbbbbbbbbbb", "flwr-1.42.1-cccccccccccc"]
    settings = venv_tree(tmp_path, names)
    venvs = tmp_path / "opt" / "venvs"
    wheelhouses = tmp_path / "opt" / "wheelhouses"

    first = run_retire(settings, names[0], names[1])

    assert first == ""
    assert (venvs / names[0]).is_dir(), "the rollback target was deleted"
    assert (venvs / ".melody-history-melody-test.service").read_text().split() == [
        str(venvs / names[0]), str(venvs / names[1])]

    second = run_retire(settings, names[1], names[2])

    assert f"retired venv {venvs / names[0]}" in second
    assert not (venvs / names[0]).exists()
    assert not (wheelhouses / "aaaaaaaaaaaa").exists()
    assert (venvs / names[1]).is_dir(), "the rollback target was deleted"
    assert (venvs / names[2]).is_dir(), "the venv in use was deleted"
    assert (wheelhouses / "bbbbbbbbbbbb").is_dir()


def test_retire_after_three_keeps_two_old(tmp_path):
    names = [f"flwr-1.42.{patch}-{str(patch) * 12}" for patch in range(4)]
    settings = {**venv_tree(tmp_path, names), "melody_venv_retire_after": 3}
    venvs = tmp_path / "opt" / "venvs"

    for previous, current in zip(names, names[1:]):
        run_retire(settings, previous, current)

    assert not (venvs / names[0]).exists()
    assert all((venvs / name).is_dir() for name in names[1:])


def test_researcher_cli_mismatch_named():
    # This machine's flwr is 1.42.0, the version the project's venv pins.
    on_127 = [{"melody_flwr_version": "1.27.0"}, {"melody_flwr_version": "1.27.0"}, {"melody_flwr_version": "1.27.0"}]

    mismatch = cli_version_mismatch(specs(*on_127))

    assert "this machine's flwr is 1.42.0 but the SuperLink runs 1.27.0" in mismatch
    assert "flwr==1.27.0" in mismatch
    assert cli_version_mismatch(specs({"melody_flwr_version": "1.42.1"}, {})) is None
