"""Command lines rendered from the flags of the real flwr 1.27.0 and 1.42.0 packages."""

from __future__ import annotations

import shlex

import pytest

from melody_deploy import flwr_cli, flwr_flags
from melody_deploy.errors import DeployError
from melody_deploy.preflight import HostSpec, validate_inventory
from melody_deploy.units import REMOTE_TLS, host_paths, render_superlink_unit, render_supernode_unit

WHEELHOUSE_ID = "0123456789ab"

# The MELODY README's deployment on flwr 1.27: three SuperLink listeners and
# the SuperNode's ClientAppIo API on 9095.
README_PORTS = {"melody_superlink_port": 9092, "melody_superlink_internal_port": 9093}


@pytest.fixture(scope="module")
def flags_127(tmp_path_factory):
    # Installs flwr 1.27.0 from the package index into a probe venv, once.
    return flwr_flags.probe("1.27.0", tmp_path_factory.mktemp("flags"))


@pytest.fixture(scope="module")
def flags_142(tmp_path_factory):
    return flwr_flags.probe("1.42.0", tmp_path_factory.mktemp("flags"))


def federation(version: str, superlink_data: dict | None = None, supernode_data: dict | None = None):
    common = {"melody_flwr_version": version}
    return validate_inventory([
        HostSpec("link", ("superlink",), {"ssh_hostname": "link.example", **common, **(superlink_data or {})}),
        HostSpec("site-a", ("supernodes",), {**common, "melody_partition_id": 0, "melody_data_dir": "/srv/a",
                                             "melody_superlink_address": "link:9092", **(supernode_data or {})}),
    ])


def exec_start(unit: str) -> list[str]:
    joined = unit.replace("\\\n", " ")
    line = next(line for line in joined.splitlines() if line.startswith("ExecStart="))
    return shlex.split(line.removeprefix("ExecStart="))


def options(args: list[str]) -> dict[str, str | None]:
    """Map each `--flag` of a command line to its value (None for a switch)."""
    result = {}
    for index, arg in enumerate(args):
        if arg.startswith("--"):
            following = args[index + 1] if index + 1 < len(args) else None
            result[arg] = None if following is None or following.startswith("--") else following
    return result


def superlink_unit(version: str, flags, **data) -> str:
    result = federation(version, {**README_PORTS, **data})
    return render_superlink_unit(result.superlink, host_paths(result.superlink.settings, WHEELHOUSE_ID), flags)


def supernode_unit(version: str, flags, **data) -> str:
    node = federation(version, README_PORTS, data).supernodes[0]
    return render_supernode_unit(node, host_paths(node.settings, WHEELHOUSE_ID), ("10.0.0.5",), flags)


def test_superlink_127_three_listeners(flags_127):
    unit = superlink_unit("1.27.0", flags_127, melody_superlink_storage_dir="/var/lib/melody-superlink/ffs")
    rendered = options(exec_start(unit))

    assert rendered["--fleet-api-address"] == "0.0.0.0:9092"
    assert rendered["--control-api-address"] == "127.0.0.1:9093"
    assert rendered["--serverappio-api-address"] == "127.0.0.1:9091"
    assert rendered["--storage-dir"] == "/var/lib/melody-superlink/ffs"
    assert rendered["--database"] == "/var/lib/melody-superlink/state.db"
    assert rendered["--log-file"] == "/var/log/melody-superlink/superlink.log"
    assert "--enable-supernode-auth" in rendered
    assert rendered["--ssl-certfile"] == "/etc/melody/tls/superlink.pem"
    assert "--host" not in rendered
    assert "--port" not in rendered
    # flwr 1.27 has no such flag: its SuperLink installs nothing at run time.
    assert "--disable-runtime-dependency-installation" not in rendered
    assert "ReadWritePaths=/var/lib/melody-superlink/ffs" in unit


def test_superlink_127_fleet_listener_unrestricted(flags_127):
    unit = superlink_unit("1.27.0", flags_127)

    # SuperNodes reach this listener directly, so an IP allowlist of loopback would lock them out.
    assert "IPAddressAllow=" not in unit
    assert "Fleet listener of their own" in unit


def test_superlink_142_one_http_server(flags_142):
    unit = superlink_unit("1.42.0", flags_142)
    rendered = options(exec_start(unit))

    assert rendered["--host"] == "127.0.0.1"
    assert rendered["--port"] == "9093"
    assert "--disable-runtime-dependency-installation" in rendered
    assert "--fleet-api-address" not in rendered
    assert "--control-api-address" not in rendered
    assert "--serverappio-api-address" not in rendered
    assert "IPAddressAllow=localhost" in unit


def test_supernode_127_clientappio_address(flags_127):
    unit = supernode_unit("1.27.0", flags_127, melody_supernode_port=9095)
    args = exec_start(unit)
    rendered = options(args)

    assert args[:3] == [f"/opt/melody/venvs/flwr-1.27.0-{WHEELHOUSE_ID}/bin/python", "-m", "melody_audit.supernode"]
    assert rendered["--clientappio-api-address"] == "127.0.0.1:9095"
    assert rendered["--superlink"] == "link:9092"
    assert rendered["--auth-supernode-private-key"] == "/var/lib/melody-supernode/auth/supernode-key"
    assert "--host" not in rendered
    assert "--port" not in rendered


def test_supernode_142_host_and_port(flags_142):
    rendered = options(exec_start(supernode_unit("1.42.0", flags_142, melody_supernode_port=9095)))

    assert rendered["--host"] == "127.0.0.1"
    assert rendered["--port"] == "9095"
    assert "--clientappio-api-address" not in rendered


def test_storage_dir_on_142_names_setting_version_fix(flags_142):
    settings = federation("1.42.0", {**README_PORTS, "melody_superlink_storage_dir": "/srv/ffs"}).superlink.settings
    found = flwr_cli.option_problems(
        "flower-superlink", "1.42.0", flwr_cli.superlink_options(settings, flags_142, REMOTE_TLS), flags_142.superlink,
    )

    assert len(found) == 1
    assert "melody_superlink_storage_dir" in found[0]
    assert "flwr 1.42.0" in found[0]
    assert "--storage-dir" in found[0]
    assert "change the setting, or pin a flwr release" in found[0]
    with pytest.raises(DeployError, match="melody_superlink_storage_dir"):
        superlink_unit("1.42.0", flags_142, melody_superlink_storage_dir="/srv/ffs")


def test_deprecated_flag_counts_as_missing(flags_142):
    # flwr 1.42 still parses --fleet-api-address but only warns about it.
    option = flwr_cli.Option("--fleet-api-address", "0.0.0.0:9092", setting="melody_superlink_port")
    found = flwr_cli.option_problems("flower-superlink", "1.42.0", [option], flags_142.superlink)

    assert found and "marks as deprecated" in found[0]


def test_release_without_known_family_fails():
    bare = flwr_flags.CommandFlags(frozenset({"--insecure"}), frozenset())
    flags = flwr_flags.FlwrFlags("9.9.9", bare, bare)

    with pytest.raises(DeployError, match="neither --host/--port nor --fleet-api-address"):
        flwr_cli.superlink_options({"melody_insecure": True, "melody_superlink_state_dir": "/s",
                                    "melody_superlink_log_dir": "/l", "melody_superlink_listen_host": "0.0.0.0",
                                    "melody_superlink_port": 1, "melody_superlink_internal_port": 2}, flags, None)


@pytest.mark.parametrize(("version", "expected"), [
    ("1.42.0", None),
    ("1.27.0", None),
    ("1.26.9", "older than flwr 1.27.0"),
    ("1.42", "not a flwr release of the form X.Y.Z"),
    ("1.42.0rc1", "not a flwr release of the form X.Y.Z"),
    ("", "not a flwr release of the form X.Y.Z"),
])
def test_version_problem(version, expected):
    problem = flwr_cli.version_problem(version)

    if expected is None:
        assert problem is None
    else:
        assert expected in problem
        assert repr(version) in problem
