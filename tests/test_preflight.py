"""Inventory validation: each bad value stops the deploy with a message naming it."""

from __future__ import annotations

import copy

import pytest

from melody_deploy.errors import PreflightError
from melody_deploy.preflight import HostSpec, validate_inventory
from melody_deploy.security import check_insecure_consistent


def valid_specs() -> list[HostSpec]:
    return [
        HostSpec("link", ("superlink",), {"ssh_hostname": "link.example"}),
        HostSpec("site-a", ("supernodes",), {"melody_partition_id": 0, "melody_data_dir": "/srv/a"}),
        HostSpec("site-b", ("supernodes",), {"melody_partition_id": 1, "melody_data_dir": "/srv/b"}),
    ]


def with_data(host: str, **data) -> list[HostSpec]:
    specs = copy.deepcopy(valid_specs())
    for spec in specs:
        if spec.name == host:
            spec.data.update(data)
    return specs


def problems_of(specs: list[HostSpec]) -> str:
    with pytest.raises(PreflightError) as caught:
        validate_inventory(specs)
    return str(caught.value)


def test_valid_inventory_applies_defaults():
    federation = validate_inventory(valid_specs())

    assert federation.superlink.name == "link"
    assert federation.superlink.settings["melody_superlink_port"] == 8000
    assert federation.superlink.settings["melody_flwr_version"] == "1.42.0"
    assert [node.name for node in federation.supernodes] == ["site-a", "site-b"]


def test_superlink_address_defaults_to_inventory_host():
    federation = validate_inventory(valid_specs())

    assert federation.supernodes[0].settings["melody_superlink_address"] == "link:8000"
    assert federation.supernodes[0].settings["melody_num_partitions"] == 2


def test_superlink_address_by_ssh_hostname_accepted():
    federation = validate_inventory(with_data("site-a", melody_superlink_address="link.example:8000"))

    assert federation.supernodes[0].settings["melody_superlink_address"] == "link.example:8000"


BAD_INVENTORIES = [
    pytest.param(
        with_data("site-a", melody_partition_id="zero"),
        ["site-a", "melody_partition_id", "'zero'", "must be of type int"],
        id="partition-id-not-integer",
    ),
    pytest.param(
        with_data("site-a", melody_partition_id=True),
        ["site-a", "melody_partition_id", "True"],
        id="partition-id-bool",
    ),
    pytest.param(
        with_data("site-b", melody_partition_id=0),
        ["site-b", "melody_partition_id", "also used by host site-a"],
        id="duplicate-partition-id",
    ),
    pytest.param(
        with_data("site-a", melody_partition_id=-1),
        ["site-a", "melody_partition_id", "0 or more"],
        id="negative-partition-id",
    ),
    pytest.param(
        [spec for spec in valid_specs() if spec.name != "site-b"]
        + [HostSpec("site-b", ("supernodes",), {"melody_partition_id": 1})],
        ["site-b", "melody_data_dir", "missing"],
        id="data-dir-missing",
    ),
    pytest.param(
        with_data("site-a", melody_data_dir="data/images"),
        ["site-a", "melody_data_dir", "'data/images'", "absolute path"],
        id="data-dir-relative",
    ),
    pytest.param(
        with_data("site-a", melody_data_dir="/srv/my images"),
        ["site-a", "melody_data_dir", "absolute path"],
        id="data-dir-with-space",
    ),
    pytest.param(
        with_data("site-a", melody_superlink_address="other.example:8000"),
        ["site-a", "melody_superlink_address", "'other.example'", "not the inventory's SuperLink"],
        id="superlink-address-not-in-inventory",
    ),
    pytest.param(
        with_data("site-a", melody_superlink_address="link:9000"),
        ["site-a", "melody_superlink_address", "port 9000", "melody_superlink_port = 8000"],
        id="superlink-address-wrong-port",
    ),
    pytest.param(
        with_data("site-a", melody_superlink_address="link"),
        ["site-a", "melody_superlink_address", "not HOST:PORT"],
        id="superlink-address-without-port",
    ),
    pytest.param(
        with_data("site-a", melody_flwr_version="1.42.5"),
        ["site-a", "melody_flwr_version", "'1.42.5'", "egress record", "1.27.0, 1.42.0"],
        id="supernode-flwr-version-unchecked",
    ),
    pytest.param(
        with_data("link", melody_flwr_version="1.20.0"),
        ["link", "melody_flwr_version", "'1.20.0'", "older than flwr 1.27.0"],
        id="flwr-version-too-old",
    ),
    pytest.param(
        with_data("link", melody_flwr_version="latest"),
        ["link", "melody_flwr_version", "'latest'"],
        id="flwr-version-not-a-release",
    ),
    pytest.param(
        with_data("site-a", melody_flwr_version="1.41.0"),
        ["melody_flwr_version", "differs", "1.41 on site-a", "1.42 on link, site-b"],
        id="flwr-minor-differs",
    ),
    pytest.param(
        with_data("link", melody_torch_build="rocm"),
        ["link", "melody_torch_build", "'rocm'", "'cpu', 'cuda'"],
        id="unknown-torch-build",
    ),
    pytest.param(
        with_data("link", melody_superlink_port=70000),
        ["link", "melody_superlink_port", "70000", "1 to 65535"],
        id="port-out-of-range",
    ),
    pytest.param(
        with_data("link", melody_superlink_port="8000"),
        ["link", "melody_superlink_port", "'8000'", "str"],
        id="port-as-string",
    ),
    pytest.param(
        with_data("link", melody_service_user="Melody User"),
        ["link", "melody_service_user", "not a valid system user"],
        id="bad-user-name",
    ),
    pytest.param(
        with_data("site-a", melody_data_dirs="/srv/a"),
        ["site-a", "unknown setting 'melody_data_dirs'", "did you mean 'melody_data_dir'"],
        id="unknown-key-with-suggestion",
    ),
    pytest.param(
        with_data("site-a", melody_node_config={"data-dir": "/elsewhere"}),
        ["site-a", "melody_node_config", "'data-dir'", "melody_data_dir"],
        id="node-config-overrides-reserved-key",
    ),
    pytest.param(
        with_data("site-a", melody_node_config={"image-size": [28, 28]}),
        ["site-a", "melody_node_config", "image-size", "string, an integer or a float"],
        id="node-config-list-value",
    ),
    pytest.param(
        valid_specs() + [HostSpec("link-2", ("superlink",), {})],
        ["exactly one host in the 'superlink' group", "found 2 (link, link-2)"],
        id="two-superlinks",
    ),
    pytest.param(
        [spec for spec in valid_specs() if spec.name != "link"],
        ["exactly one host in the 'superlink' group", "found 0"],
        id="no-superlink",
    ),
    pytest.param(
        [HostSpec("both", ("superlink", "supernodes"), {})] + valid_specs()[1:],
        ["both", "in both the 'superlink' and 'supernodes' groups"],
        id="host-in-both-groups",
    ),
]


@pytest.mark.parametrize(("specs", "expected"), BAD_INVENTORIES)
def test_bad_inventory_names_host_setting_and_value(specs, expected):
    message = problems_of(specs)

    for fragment in expected:
        assert fragment in message


def test_all_problems_reported_together():
    specs = with_data("site-a", melody_partition_id="zero", melody_data_dir="relative")

    message = problems_of(specs)

    assert "melody_partition_id" in message
    assert "melody_data_dir" in message
    assert "no host was changed" in message


def test_insecure_on_some_hosts_rejected():
    specs = with_data("site-a", melody_insecure=True)

    with pytest.raises(PreflightError) as caught:
        check_insecure_consistent(validate_inventory(specs))

    assert "setting 'melody_insecure' is True on site-a only" in str(caught.value)


def test_insecure_on_every_host_accepted():
    specs = valid_specs()
    for spec in specs:
        spec.data["melody_insecure"] = True

    check_insecure_consistent(validate_inventory(specs))


def test_type_error_shows_valid_example():
    message = problems_of(with_data("site-a", melody_partition_id="0"))

    assert "it must be of type int, such as 0" in message
