"""The lab bridge on this machine, which links the hosts to each other and to this machine only.

The lab adds no NAT and leaves ip_forward alone, and hosts get no default
route, so lab traffic stays on the bridge.
"""

import ipaddress
import json
import logging
import subprocess
from pathlib import Path

log = logging.getLogger(__name__)


class NetworkError(RuntimeError):
    """The lab network cannot be set up as requested."""


def _ip(*arguments: str) -> str:
    result = subprocess.run(["ip", *arguments], capture_output=True, text=True)
    if result.returncode != 0:
        raise NetworkError(f"ip {' '.join(arguments)} failed: {result.stderr.strip()}")
    return result.stdout


def is_bridge(name: str) -> bool:
    """Return whether a bridge interface called `name` exists."""
    return Path("/sys/class/net", name, "bridge").is_dir()


def check_subnet_free(network: ipaddress.IPv4Network, bridge: str) -> None:
    """Raise NetworkError when a route not owned by the lab bridge overlaps `network`."""
    routes = json.loads(_ip("-json", "-4", "route", "show", "table", "all") or "[]")
    for route in routes:
        destination = route.get("dst", "default")
        if destination == "default" or route.get("dev") == bridge:
            continue
        if ipaddress.ip_network(destination, strict=False).overlaps(network):
            raise NetworkError(
                f"lab subnet {network} overlaps the existing route "
                f"{route.get('type', '')} {destination} dev {route.get('dev')}; "
                "choose a free private subnet with --subnet"
            )


def create_bridge(bridge: str, interface: ipaddress.IPv4Interface) -> None:
    """Create the bridge with this machine's lab address, or reuse the lab's own bridge."""
    if Path("/sys/class/net", bridge).exists() and not is_bridge(bridge):
        raise NetworkError(f"interface {bridge} exists and is not a bridge; remove it or rename the lab bridge")

    if not is_bridge(bridge):
        _ip("link", "add", bridge, "type", "bridge")
        log.info("network: created bridge %s", bridge)

    # The lab uses IPv4 only. Without IPv6 the bridge sends no router
    # solicitations or multicast listener reports.
    disable_ipv6 = Path("/proc/sys/net/ipv6/conf", bridge, "disable_ipv6")
    if disable_ipv6.exists():
        disable_ipv6.write_text("1\n")
    _ip("address", "replace", str(interface), "dev", bridge)
    _ip("link", "set", bridge, "up")


def delete_bridge(bridge: str) -> None:
    """Delete the lab bridge if it exists."""
    if is_bridge(bridge):
        _ip("link", "delete", bridge)
        log.info("network: deleted bridge %s", bridge)
