"""Checks of one host's security settings: researcher access and TLS options.

Preflight runs these with the other value checks, before any host is changed.
"""

from __future__ import annotations

import ipaddress

from cryptography.hazmat.primitives import serialization

from . import tls

# Key types that OpenSSH accepts for a researcher's tunnel login.
SSH_KEY_TYPES = (
    "ssh-ed25519",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "ssh-rsa",
)
MIN_RSA_BITS = 3072


def check_researcher_networks(name: str, networks, problems: list[str]) -> None:
    for network in networks:
        try:
            ipaddress.ip_network(network, strict=True)
        except (TypeError, ValueError) as error:
            problems.append(
                f"host {name}: setting 'melody_researcher_networks' holds {network!r}, which is not "
                f"an IP network ({error}); write each network in CIDR form, such as '10.20.0.0/24' "
                f"or '10.20.0.7/32'"
            )


def check_researcher_keys(name: str, keys, problems: list[str]) -> None:
    for line in keys:
        if not isinstance(line, str) or line.split(" ", 1)[0] not in SSH_KEY_TYPES:
            problems.append(
                f"host {name}: setting 'melody_researcher_ssh_keys' holds {str(line)[:40]!r}, which is "
                f"not an OpenSSH public key line; give the content of the researcher's .pub file, "
                f"starting with one of {', '.join(SSH_KEY_TYPES)}, without options"
            )
            continue
        try:
            key = serialization.load_ssh_public_key(" ".join(line.split()[:2]).encode())
        except (ValueError, TypeError) as error:
            problems.append(
                f"host {name}: setting 'melody_researcher_ssh_keys' holds a {line.split()[0]} key that "
                f"does not parse ({error}); copy the whole line of the researcher's .pub file again"
            )
            continue
        if line.startswith("ssh-rsa") and key.key_size < MIN_RSA_BITS:
            problems.append(
                f"host {name}: setting 'melody_researcher_ssh_keys' holds an RSA key of {key.key_size} "
                f"bits; use ssh-ed25519 or RSA of at least {MIN_RSA_BITS} bits"
            )


def check_security_values(name: str, settings: dict, problems: list[str]) -> None:
    """Check one host's security settings that have the right type but may be invalid."""
    check_researcher_networks(name, settings.get("melody_researcher_networks", ()), problems)
    check_researcher_keys(name, settings.get("melody_researcher_ssh_keys", ()), problems)

    supplied = [key for key in tls.SUPPLIED_SETTINGS if settings.get(key) is not None]
    if supplied and len(supplied) != len(tls.SUPPLIED_SETTINGS):
        missing = [key for key in tls.SUPPLIED_SETTINGS if key not in supplied]
        problems.append(
            f"host {name}: {', '.join(supplied)} set without {', '.join(missing)}; set all three to "
            f"use your own certificate, or none to let the deploy generate one"
        )

    for key in ("melody_tls_valid_days", "melody_tls_renew_days"):
        days = settings.get(key)
        if days is not None and days < 1:
            problems.append(f"host {name}: setting '{key}' = {days} must be 1 or more")
    valid, renew = settings.get("melody_tls_valid_days"), settings.get("melody_tls_renew_days")
    if isinstance(valid, int) and isinstance(renew, int) and renew >= valid:
        problems.append(
            f"host {name}: setting 'melody_tls_renew_days' = {renew} is not below "
            f"melody_tls_valid_days = {valid}, so every deploy would renew the certificate; "
            f"make the renewal window shorter than the validity"
        )

    for item in settings.get("melody_tls_names", ()):
        if not isinstance(item, str) or not item or " " in item:
            problems.append(
                f"host {name}: setting 'melody_tls_names' holds {item!r}; give DNS names or IP "
                f"addresses as strings, such as 'superlink.melody.example'"
            )

    internal = settings.get("melody_superlink_internal_port")
    if internal is not None and internal == settings.get("melody_superlink_port"):
        problems.append(
            f"host {name}: setting 'melody_superlink_internal_port' = {internal} equals "
            f"melody_superlink_port; nginx listens on melody_superlink_port, so pick another port"
        )
