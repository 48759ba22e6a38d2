"""Address plan of the lab: which hosts exist, their roles, addresses and shards."""

import ipaddress
from dataclasses import dataclass

from melody_lab.settings import MAX_SUPERNODES

# Host addresses are offsets into the subnet: the bridge on this machine takes
# .1, the superlink .10 and supernode-k .10+k, which leaves room for 16
# supernodes in any /27 or larger.
BRIDGE_OFFSET = 1
SUPERLINK_OFFSET = 10

# Lab subnets must stay inside the private ranges of RFC 1918, so the route
# to the bridge can never hide a public address from this machine.
PRIVATE_RANGES = tuple(
    ipaddress.IPv4Network(cidr) for cidr in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16")
)


class PlanError(ValueError):
    """The requested lab shape or subnet is invalid."""


@dataclass(frozen=True)
class HostPlan:
    """One planned lab host; supernodes also carry the shard they receive."""

    name: str
    role: str
    address: str
    partition_id: int | None = None
    num_partitions: int | None = None


def parse_subnet(cidr: str) -> ipaddress.IPv4Network:
    """Parse and check a lab subnet such as 10.231.76.0/24."""
    try:
        network = ipaddress.ip_network(cidr, strict=True)
    except ValueError as error:
        raise PlanError(f"invalid lab subnet {cidr!r}: {error}; expected e.g. 10.231.76.0/24") from None
    if network.version != 4:
        raise PlanError(f"invalid lab subnet {cidr}: the lab uses IPv4 only")
    if not any(network.subnet_of(private) for private in PRIVATE_RANGES):
        raise PlanError(
            f"invalid lab subnet {cidr}: it must lie inside 10.0.0.0/8, 172.16.0.0/12 or 192.168.0.0/16"
        )
    last_offset = SUPERLINK_OFFSET + MAX_SUPERNODES
    if network.num_addresses < last_offset + 2:
        raise PlanError(
            f"invalid lab subnet {cidr}: too small, the lab needs {last_offset + 2} addresses "
            f"for the bridge, the superlink and {MAX_SUPERNODES} supernodes"
        )
    return network


def bridge_interface(network: ipaddress.IPv4Network) -> ipaddress.IPv4Interface:
    """Return the address of this machine on the lab bridge, with the prefix length."""
    return ipaddress.IPv4Interface(f"{network[BRIDGE_OFFSET]}/{network.prefixlen}")


def plan_hosts(network: ipaddress.IPv4Network, supernodes: int) -> list[HostPlan]:
    """Return the superlink and the supernodes in boot order."""
    if not 1 <= supernodes <= MAX_SUPERNODES:
        raise PlanError(f"invalid supernode count {supernodes}: expected 1 to {MAX_SUPERNODES}")

    hosts = [HostPlan("superlink", "superlink", str(network[SUPERLINK_OFFSET]))]
    for index in range(1, supernodes + 1):
        hosts.append(
            HostPlan(
                name=f"supernode-{index}",
                role="supernode",
                address=str(network[SUPERLINK_OFFSET + index]),
                partition_id=index - 1,
                num_partitions=supernodes,
            )
        )
    return hosts
