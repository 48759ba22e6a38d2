"""More malformed inventories: ports, shared machines, nested paths, types, key typos.

Each case must fail validation, which runs before pyinfra changes any host,
with one message that names the host, the setting and the fix.
"""

from __future__ import annotations

import copy

import pytest

from melody_deploy.errors import PreflightError
from melody_deploy.preflight import HostSpec, validate_inventory
from test_preflight import problems_of, valid_specs, with_data


def with_hosts(*extra: HostSpec) -> list[HostSpec]:
    return copy.deepcopy(valid_specs()) + list(extra)


BAD_INVENTORIES = [
    pytest.param(
        with_data("link", melody_superlink_port=0),
        ["host link", "melody_superlink_port", "= 0", "1 to 65535"],
        id="port-zero",
    ),
    pytest.param(
        with_data("site-a", melody_supernode_port=65536),
        ["host site-a", "melody_supernode_port", "65536", "1 to 65535"],
        id="supernode-port-above-range",
    ),
    pytest.param(
        with_data("link", melody_superlink_port=443),
        ["host link", "melody_superlink_port", "443", "privileged port", "1024 to 65535"],
        id="port-privileged",
    ),
    pytest.param(
        with_hosts(HostSpec("site-c", ("supernodes",), {
            "ssh_hostname": "link.example", "melody_partition_id": 2,
            "melody_data_dir": "/srv/c", "melody_supernode_port": 8000,
        })),
        ["host site-c", "melody_supernode_port", "= 8000", "clashes with 'melody_superlink_port' of host link",
         "pick another port"],
        id="ports-clash-on-shared-machine",
    ),
    pytest.param(
        with_data("site-b", ssh_hostname="site-a"),
        ["hosts site-a, site-b", "address 'site-a'", "one SuperNode", "fix ssh_hostname"],
        id="two-supernodes-one-machine",
    ),
    pytest.param(
        with_data("site-a", melody_supernode_state_dir="var/lib/melody-supernode"),
        ["host site-a", "melody_supernode_state_dir", "'var/lib/melody-supernode'", "absolute path",
         "such as '/var/lib/melody-supernode'"],
        id="state-dir-relative",
    ),
    pytest.param(
        with_data("link", melody_superlink_log_dir="/var/log/../melody"),
        ["host link", "melody_superlink_log_dir", "'/var/log/../melody'", "without '..'"],
        id="log-dir-with-parent-reference",
    ),
    pytest.param(
        with_data("link", melody_install_dir="~/melody"),
        ["host link", "melody_install_dir", "'~/melody'", "absolute path"],
        id="install-dir-home-relative",
    ),
    pytest.param(
        with_data("site-a", melody_supernode_state_dir="/srv/a/state"),
        ["host site-a", "melody_data_dir", "overlaps 'melody_supernode_state_dir'", "outside it"],
        id="state-dir-inside-data-dir",
    ),
    pytest.param(
        with_data("site-a", melody_data_dir="/opt/melody/data"),
        ["host site-a", "melody_data_dir", "'/opt/melody/data'", "overlaps 'melody_install_dir'"],
        id="data-dir-inside-install-dir",
    ),
    pytest.param(
        with_data("link", melody_insecure="yes"),
        ["host link", "melody_insecure", "'yes'", "must be of type bool"],
        id="insecure-as-string",
    ),
    pytest.param(
        with_data("site-a", melody_node_config=["image-size=28"]),
        ["host site-a", "melody_node_config", "is a list", "must be of type dict"],
        id="node-config-as-list",
    ),
    pytest.param(
        with_data("link", melody_pip_download_args="--index-url /srv/wheels"),
        ["host link", "melody_pip_download_args", "is a str", "list or tuple"],
        id="pip-args-as-string",
    ),
    pytest.param(
        with_data("link", melody_log_backup_count=2.5),
        ["host link", "melody_log_backup_count", "2.5", "is a float", "type int"],
        id="backup-count-as-float",
    ),
    pytest.param(
        with_data("link", melody_verify_min_free_mb=-1),
        ["host link", "melody_verify_min_free_mb", "-1", "0 or more"],
        id="min-free-negative",
    ),
    pytest.param(
        with_data("link", melody_teardown_purge="no"),
        ["host link", "melody_teardown_purge", "'no'", "type bool"],
        id="purge-as-string",
    ),
    pytest.param(
        with_data("site-a", partition_id=3),
        ["host site-a", "unknown key 'partition_id'", "did you mean 'melody_partition_id'"],
        id="key-without-prefix",
    ),
    pytest.param(
        with_data("link", melody_superlink_prot=9000),
        ["host link", "unknown setting 'melody_superlink_prot'", "did you mean 'melody_superlink_port'"],
        id="misspelt-port-key",
    ),
    pytest.param(
        with_data("site-b", melody_partition_id=0, melody_data_dir="/srv/a"),
        ["host site-b", "melody_partition_id", "also used by host site-a"],
        id="duplicate-site",
    ),
    pytest.param(
        with_hosts(HostSpec("link-b", ("superlink",), {"melody_superlink_port": 8001})),
        ["exactly one host in the 'superlink' group", "found 2 (link, link-b)"],
        id="second-superlink",
    ),
]


@pytest.mark.parametrize(("specs", "expected"), BAD_INVENTORIES)
def test_bad_inventory_rejected_with_fix(specs, expected):
    message = problems_of(specs)

    for fragment in expected:
        assert fragment in message


def test_supernode_beside_superlink_on_other_port_accepted():
    specs = with_hosts(HostSpec("site-c", ("supernodes",), {
        "ssh_hostname": "link.example", "melody_partition_id": 2, "melody_data_dir": "/srv/c",
    }))

    federation = validate_inventory(specs)

    assert [node.name for node in federation.supernodes] == ["site-a", "site-b", "site-c"]


def test_pyinfra_connection_keys_not_flagged():
    specs = with_data("site-a", ssh_user="root", ssh_port=2222, _sudo=True)

    validate_inventory(specs)


def test_privileged_port_reported_once():
    specs = with_data("site-a", melody_supernode_port=80)

    with pytest.raises(PreflightError) as caught:
        validate_inventory(specs)

    assert len(caught.value.problems) == 1
    assert caught.value.problems[0].startswith("host site-a: setting 'melody_supernode_port' = 80")
