"""Unit tests of the lab's address plan."""

import ipaddress

import pytest

from melody_lab.plan import PlanError, bridge_interface, parse_subnet, plan_hosts
from melody_lab.settings import MAX_SUPERNODES

# A literal rather than the lab default, which MELODY_LAB_SUBNET may change.
DEFAULT_SUBNET = "10.231.76.0/24"


def test_default_plan_addresses():
    hosts = plan_hosts(parse_subnet(DEFAULT_SUBNET), 2)

    assert [host.name for host in hosts] == ["superlink", "supernode-1", "supernode-2"]
    assert [host.role for host in hosts] == ["superlink", "supernode", "supernode"]
    assert [host.address for host in hosts] == ["10.231.76.10", "10.231.76.11", "10.231.76.12"]


def test_bridge_takes_first_address():
    assert bridge_interface(parse_subnet(DEFAULT_SUBNET)) == ipaddress.IPv4Interface("10.231.76.1/24")


def test_supernodes_get_partitions():
    hosts = plan_hosts(parse_subnet(DEFAULT_SUBNET), 3)

    assert hosts[0].partition_id is None
    assert hosts[0].num_partitions is None
    assert [host.partition_id for host in hosts[1:]] == [0, 1, 2]
    assert {host.num_partitions for host in hosts[1:]} == {3}


def test_max_plan_fits_smallest_subnet():
    network = parse_subnet("192.168.7.0/26")
    hosts = plan_hosts(network, MAX_SUPERNODES)

    assert len(hosts) == MAX_SUPERNODES + 1
    assert len({host.address for host in hosts}) == len(hosts)
    for host in hosts:
        address = ipaddress.IPv4Address(host.address)
        assert address in network
        assert address != network.broadcast_address
        # nspawn names the bridge port vb-NAME, and interface names stop at 15 characters.
        assert len(host.name) <= 12


@pytest.mark.parametrize("count", [0, -1, MAX_SUPERNODES + 1])
def test_plan_rejects_supernode_count(count):
    with pytest.raises(PlanError, match="supernode count"):
        plan_hosts(parse_subnet(DEFAULT_SUBNET), count)


@pytest.mark.parametrize(
    ("cidr", "reason"),
    [
        ("not-a-subnet", "invalid lab subnet"),
        ("10.231.76.1/24", "host bits set"),
        ("fd00::/64", "IPv4 only"),
        ("203.0.113.0/24", "must lie inside"),
        ("10.231.76.0/28", "too small"),
    ],
)
def test_parse_subnet_rejects(cidr, reason):
    with pytest.raises(PlanError, match=reason):
        parse_subnet(cidr)
