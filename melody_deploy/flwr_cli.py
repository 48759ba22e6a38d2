"""Command lines of flower-superlink and flower-supernode for a flwr release.

Flower's flags move between minor releases. flwr 1.40 and later serve the
Fleet, Control and Runtime APIs on one HTTP server (`--host`/`--port`) and no
longer have `--storage-dir`, `--serverappio-api-address` or
`--clientappio-api-address` (read from the argument parsers of the released
wheels). Only releases whose flags are listed here are accepted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Minor releases whose command line is the single-HTTP-server one.
HTTP_API_MINORS = ((1, 40), (1, 41), (1, 42))

VERSION_PATTERN = re.compile(r"^(\d+)\.(\d+)\.(\d+)$")


@dataclass(frozen=True)
class ServerTls:
    """Paths of the SuperLink's CA certificate, certificate and key on its host."""

    ca_certificate: str
    certificate: str
    key: str


def parse_version(version: str) -> tuple[int, int, int]:
    """Parse `X.Y.Z`; raise ValueError for anything else (pre-releases included)."""
    match = VERSION_PATTERN.match(version)
    if not match:
        raise ValueError(f"not a release version of the form X.Y.Z: {version!r}")
    major, minor, patch = (int(part) for part in match.groups())
    return major, minor, patch


def supported_versions_text() -> str:
    return ", ".join(f"{major}.{minor}.x" for major, minor in HTTP_API_MINORS)


def is_supported(version: str) -> bool:
    try:
        major, minor, _ = parse_version(version)
    except ValueError:
        return False
    return (major, minor) in HTTP_API_MINORS


def superlink_args(
    *,
    listen_host: str,
    port: int,
    database: str,
    log_file: str,
    log_rotation_hours: int,
    log_backup_count: int,
    insecure: bool,
    tls: ServerTls | None = None,
) -> list[str]:
    """Return the flower-superlink arguments, one flag with its value per item.

    Without `insecure`, `tls` names the certificate files on the host.
    """
    args = [
        f"--host {listen_host}",
        f"--port {port}",
        f"--database {database}",
        f"--log-file {log_file}",
        f"--log-rotation-interval-hours {log_rotation_hours}",
        f"--log-rotation-backup-count {log_backup_count}",
        # Hosts in a TRE are offline and must run only what was installed.
        "--disable-runtime-dependency-installation",
        "--isolation subprocess",
    ]
    if insecure:
        args.append("--insecure")
    else:
        # SuperNode authentication refuses to start without TLS on the SuperLink itself.
        args += [
            f"--ssl-certfile {tls.certificate}",
            f"--ssl-keyfile {tls.key}",
            f"--ssl-ca-certfile {tls.ca_certificate}",
            "--enable-supernode-auth",
        ]
    return args


def supernode_args(
    *,
    superlink_address: str,
    listen_host: str,
    port: int,
    node_config: str,
    insecure: bool,
    root_certificates: str | None = None,
    auth_private_key: str | None = None,
) -> list[str]:
    """Return the flower-supernode arguments, one flag with its value per item.

    `node_config` is already quoted for a systemd command line. Without
    `insecure`, the SuperNode checks the SuperLink's certificate against
    `root_certificates` and signs its requests with `auth_private_key`.
    """
    args = [
        f"--superlink {superlink_address}",
        f"--host {listen_host}",
        f"--port {port}",
        f"--node-config {node_config}",
        "--isolation subprocess",
    ]
    if insecure:
        args.append("--insecure")
    else:
        args += [
            f"--root-certificates {root_certificates}",
            f"--auth-supernode-private-key {auth_private_key}",
        ]
    return args
