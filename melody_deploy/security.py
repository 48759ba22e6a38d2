"""Preflight of the federation's TLS mode and files, run before any host is changed.

It runs on the operator's machine and may create or renew generated certificates there.
"""

from __future__ import annotations

import logging
from pathlib import Path

from . import tls
from .errors import PreflightError
from .preflight import Federation, parse_host_port

logger = logging.getLogger("pyinfra")


def superlink_names(federation: Federation) -> list[str]:
    """Return the names the SuperLink's certificate must carry, first the inventory name."""
    superlink = federation.superlink
    names = [superlink.name, superlink.address]
    listen_host = superlink.settings["melody_superlink_listen_host"]
    if listen_host not in ("0.0.0.0", "::"):
        names.append(listen_host)
    for supernode in federation.supernodes:
        parsed = parse_host_port(supernode.settings.get("melody_superlink_address") or "")
        if parsed is not None:
            names.append(parsed[0])
    names += list(superlink.settings["melody_tls_names"])
    names += list(tls.LOOPBACK_NAMES)
    return list(dict.fromkeys(names))


def check_insecure_consistent(federation: Federation) -> None:
    """Raise PreflightError unless every host agrees on melody_insecure."""
    hosts = [federation.superlink, *federation.supernodes]
    insecure = sorted(host.name for host in hosts if host.settings["melody_insecure"])
    if insecure and len(insecure) != len(hosts):
        raise PreflightError([
            f"setting 'melody_insecure' is True on {', '.join(insecure)} only; SuperNodes without "
            f"TLS cannot talk to a SuperLink with TLS, so set it the same on every host (False for TLS)"
        ])


def prepare_tls(federation: Federation) -> tls.TlsFiles | None:
    """Return the TLS files the hosts need, creating or renewing generated ones.

    Return None when the federation runs without TLS. Raise PreflightError
    when the files are unusable, before any host is changed.
    """
    check_insecure_consistent(federation)
    superlink = federation.superlink
    if superlink.settings["melody_insecure"]:
        return None

    settings = superlink.settings
    names = superlink_names(federation)
    try:
        if settings["melody_tls_server_cert"] is not None:
            files = tls.check_supplied(settings, names)
            check_supplied_renewal(files, settings["melody_tls_renew_days"])
            return files
        folder = Path(settings["melody_tls_dir"]).expanduser().resolve()
        return tls.ensure_generated(folder, names, settings["melody_tls_valid_days"],
                                    settings["melody_tls_renew_days"])
    except tls.TlsError as error:
        raise PreflightError([f"host {superlink.name}: {error}"]) from error


def check_supplied_renewal(files: tls.TlsFiles, renew_days: int) -> None:
    """Warn about a supplied certificate in its renewal window: only its issuer can renew it."""
    certificate = tls.load_certificate(files.server_cert, "melody_tls_server_cert")
    left = certificate.not_valid_after_utc - tls.utc_now()
    if left.days < renew_days:
        logger.warning(
            "TLS: the supplied SuperLink certificate %s expires on %s, in %d days; "
            "have it renewed and set melody_tls_server_cert to the new file",
            files.server_cert, f"{certificate.not_valid_after_utc:%Y-%m-%d}", left.days,
        )
