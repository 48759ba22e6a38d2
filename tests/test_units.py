"""Rendered systemd units: flags for the pinned flwr, PATH, audit options, sandbox."""

from __future__ import annotations

import shlex

from melody_deploy.preflight import HostSpec, validate_inventory
from melody_deploy.units import (
    host_paths,
    node_config_argument,
    render_superlink_unit,
    render_supernode_unit,
)

WHEELHOUSE_ID = "0123456789ab"


def federation(**superlink_data):
    return validate_inventory([
        HostSpec("link", ("superlink",), {"ssh_hostname": "link.example", **superlink_data}),
        HostSpec("site-a", ("supernodes",), {"melody_partition_id": 0, "melody_data_dir": "/srv/a"}),
        HostSpec("site-b", ("supernodes",), {
            "melody_partition_id": 7,
            "melody_data_dir": "/home/tre/export",
            "melody_node_config": {"image-size": 28, "site-name": "oxford"},
        }),
    ])


def service_lines(unit: str) -> dict[str, list[str]]:
    """Return each [Service] key's values, joining continued ExecStart lines."""
    joined = unit.replace("\\\n", " ")
    values: dict[str, list[str]] = {}
    for line in joined.splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            values.setdefault(key.strip(), []).append(value.strip())
    return values


def exec_start_args(unit: str) -> list[str]:
    # systemd splits ExecStart like a shell for the quoting used here.
    return shlex.split(service_lines(unit)["ExecStart"][0])


def superlink_unit(**superlink_data) -> str:
    result = federation(**superlink_data)
    return render_superlink_unit(result.superlink, host_paths(result.superlink.settings, WHEELHOUSE_ID))


def supernode_unit(index: int) -> str:
    node = federation().supernodes[index]
    return render_supernode_unit(node, host_paths(node.settings, WHEELHOUSE_ID))


def test_superlink_runs_venv_binary_with_venv_on_path():
    unit = superlink_unit()
    venv = f"/opt/melody/venvs/flwr-1.42.0-{WHEELHOUSE_ID}"

    assert exec_start_args(unit)[0] == f"{venv}/bin/flower-superlink"
    assert f"PATH={venv}/bin:/usr/local/bin:/usr/bin:/bin" in service_lines(unit)["Environment"]


def test_superlink_flags_for_flwr_142():
    args = exec_start_args(superlink_unit(melody_superlink_port=8443, melody_insecure=True))

    assert args[args.index("--host") + 1] == "0.0.0.0"
    assert args[args.index("--port") + 1] == "8443"
    assert "--disable-runtime-dependency-installation" in args
    # Flags that flwr 1.40 and later reject or only warn about.
    for removed in ("--storage-dir", "--serverappio-api-address", "--fleet-api-address",
                    "--control-api-address", "--clientappio-api-address"):
        assert removed not in args


def test_superlink_audit_options_on_persistent_disk():
    args = exec_start_args(superlink_unit(
        melody_superlink_state_dir="/data/melody/state",
        melody_log_rotation_hours=12,
        melody_log_backup_count=14,
    ))

    assert args[args.index("--database") + 1] == "/data/melody/state/state.db"
    assert args[args.index("--log-file") + 1] == "/var/log/melody-superlink/superlink.log"
    assert args[args.index("--log-rotation-interval-hours") + 1] == "12"
    assert args[args.index("--log-rotation-backup-count") + 1] == "14"


def test_offline_environment_in_both_units():
    for unit in (superlink_unit(), supernode_unit(0)):
        environment = service_lines(unit)["Environment"]
        assert "FLWR_TELEMETRY_ENABLED=0" in environment
        assert "FLWR_DISABLE_UPDATE_CHECK=1" in environment


def test_insecure_only_when_asked_and_flagged_loudly():
    secure = superlink_unit()
    insecure = superlink_unit(melody_insecure=True)

    assert "--insecure" not in exec_start_args(secure)
    assert "WARNING" not in secure
    assert "--insecure" in exec_start_args(insecure)
    assert "WARNING: --insecure turns TLS off" in insecure


def test_superlink_writes_only_state_and_logs():
    lines = service_lines(superlink_unit())

    assert lines["User"] == ["melody"]
    assert lines["ProtectSystem"] == ["strict"]
    assert lines["ReadWritePaths"] == ["/var/lib/melody-superlink", "/var/log/melody-superlink"]
    assert lines["NoNewPrivileges"] == ["yes"]


def test_supernode_flags_and_node_config():
    args = exec_start_args(supernode_unit(0))

    assert args[args.index("--superlink") + 1] == "link:8000"
    assert args[args.index("--host") + 1] == "127.0.0.1"
    assert args[args.index("--port") + 1] == "9094"
    node_config = args[args.index("--node-config") + 1]
    assert node_config == 'partition-id=0 num-partitions=2 data-dir="/srv/a"'


def test_supernode_reads_data_dir_read_only():
    lines = service_lines(supernode_unit(0))

    assert lines["ReadOnlyPaths"] == ["/srv/a"]
    assert lines["ReadWritePaths"] == ["/var/lib/melody-supernode"]
    assert lines["ProtectHome"] == ["yes"]


def test_supernode_data_under_home_stays_visible():
    lines = service_lines(supernode_unit(1))

    assert lines["ProtectHome"] == ["read-only"]
    assert lines["ReadOnlyPaths"] == ["/home/tre/export"]


def test_node_config_extra_keys_typed():
    node = federation().supernodes[1]

    rendered = shlex.split(node_config_argument(node.settings))[0]

    assert rendered.split(" ") == [
        "partition-id=7",
        "num-partitions=2",
        'data-dir="/home/tre/export"',
        "image-size=28",
        'site-name="oxford"',
    ]


def test_unit_changes_with_wheelhouse():
    node = federation().supernodes[0]

    first = render_supernode_unit(node, host_paths(node.settings, "aaaaaaaaaaaa"))
    second = render_supernode_unit(node, host_paths(node.settings, "bbbbbbbbbbbb"))

    assert first != second
    assert render_supernode_unit(node, host_paths(node.settings, "aaaaaaaaaaaa")) == first
