"""Facts the secure deploy reads from the hosts, and the preflight checks on them."""

from __future__ import annotations

import ipaddress
import shlex

from pyinfra.api import FactBase

from .preflight import parse_host_port
from .settings import SUPERLINK, SUPERNODE


class ResolvedAddresses(FactBase):
    """
    IP addresses that a host name resolves to on the host (`getent ahosts`);
    an IP address resolves to itself. Empty when the name does not resolve.

    .. code:: python

        ["10.231.76.10"]
    """

    @staticmethod
    def default():
        return []

    def command(self, hostname: str) -> str:
        return f"getent ahosts {shlex.quote(hostname)} | cut -d ' ' -f 1 | sort -u || true"

    def process(self, output):
        return [line.strip() for line in output if line.strip()]


class NginxVersion(FactBase):
    """
    Version line of the installed nginx, or None when nginx is not installed.

    .. code:: python

        "nginx version: nginx/1.22.1"
    """

    def command(self) -> str:
        return "if command -v nginx >/dev/null; then nginx -v 2>&1; else echo none; fi"

    def process(self, output):
        text = "".join(output).strip()
        return None if text == "none" else text


class AptAvailable(FactBase):
    """
    Whether the host has apt-get, to install nginx when it is missing.

    .. code:: python

        True
    """

    def command(self) -> str:
        return "command -v apt-get >/dev/null && echo yes || echo no"

    def process(self, output):
        return "".join(output).strip() == "yes"


def superlink_host_of(settings: dict) -> str:
    parsed = parse_host_port(settings["melody_superlink_address"])
    return parsed[0] if parsed else settings["melody_superlink_address"]


def egress_addresses(host, settings: dict) -> list[str]:
    """Return the SuperLink's IP addresses as this SuperNode resolves them now."""
    name = superlink_host_of(settings)
    try:
        return [str(ipaddress.ip_address(name))]
    except ValueError:
        return host.get_fact(ResolvedAddresses, hostname=name) or []


def check_security_facts(host, role: str, settings: dict) -> list[str]:
    """Return one problem line per failed security check of the host's facts."""
    if settings["melody_insecure"]:
        return []
    problems: list[str] = []
    if role == SUPERNODE and not egress_addresses(host, settings):
        name = superlink_host_of(settings)
        problems.append(
            f"host {host.name}: the SuperLink name '{name}' of setting 'melody_superlink_address' does "
            f"not resolve on this host, so its firewall cannot allow it; add the name to the host's "
            f"DNS or /etc/hosts, or use the SuperLink's IP address"
        )
    if role == SUPERLINK and host.get_fact(NginxVersion) is None and not host.get_fact(AptAvailable):
        problems.append(
            f"host {host.name}: nginx is not installed and apt-get is missing; install nginx from the "
            f"distribution, it publishes the SuperLink's Fleet API"
        )
    return problems
