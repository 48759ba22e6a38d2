"""Command lines of flower-superlink and flower-supernode for a flwr release.

Flower's flags move between minor releases, so the command line is built from
the flags that the pinned release itself accepts (`flwr_flags.probe`). Two
families exist:

- gRPC (flwr 1.27 and earlier, the flags in the MELODY README): the SuperLink
  has three listeners, `--serverappio-api-address`, `--fleet-api-address` and
  `--control-api-address`; the SuperNode serves its ClientApps on
  `--clientappio-api-address`.
- HTTP (flwr 1.33 and later for the SuperLink, 1.35 for the SuperNode): one
  HTTP server on `--host`/`--port` for every API.

An option that an inventory setting requested but the release lacks stops the
deploy with the setting, the release and the fix. A hardening option that the
release does not know is left out.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

from .errors import DeployError
from .flwr_flags import CommandFlags, FlwrFlags

logger = logging.getLogger(__name__)

VERSION_PATTERN = re.compile(r"^(\d+)\.(\d+)\.(\d+)$")

# Oldest release whose flags and Message API this deploy and melody_app were run with.
OLDEST_RELEASE = (1, 27, 0)

GRPC = "grpc"
HTTP = "http"


@dataclass(frozen=True)
class ServerTls:
    """Paths of the SuperLink's CA certificate, certificate and key on its host."""

    ca_certificate: str
    certificate: str
    key: str


@dataclass(frozen=True)
class Option:
    """One command-line option, and the inventory setting that requested it, if any."""

    flag: str
    value: str | None = None
    # Named in the error when the release lacks the flag.
    setting: str | None = None
    # False for an option that a release without the flag does not need.
    required: bool = True

    def text(self) -> str:
        return self.flag if self.value is None else f"{self.flag} {self.value}"


def parse_version(version: str) -> tuple[int, int, int]:
    """Parse `X.Y.Z`; raise ValueError for anything else (pre-releases included)."""
    match = VERSION_PATTERN.match(version)
    if not match:
        raise ValueError(f"not a release version of the form X.Y.Z: {version!r}")
    major, minor, patch = (int(part) for part in match.groups())
    return major, minor, patch


def version_problem(version: str) -> str | None:
    """Return why `version` cannot be deployed, or None."""
    try:
        parsed = parse_version(version)
    except ValueError:
        return f"{version!r} is not a flwr release of the form X.Y.Z, such as '1.42.0'"
    if parsed < OLDEST_RELEASE:
        oldest = ".".join(str(part) for part in OLDEST_RELEASE)
        return f"{version!r} is older than flwr {oldest}, the oldest release this deploy supports"
    return None


def superlink_family(flags: CommandFlags) -> str:
    if flags.usable("--host") and flags.usable("--port"):
        return HTTP
    if flags.usable("--fleet-api-address") and flags.usable("--control-api-address"):
        return GRPC
    raise DeployError("flower-superlink has neither --host/--port nor --fleet-api-address/--control-api-address; "
                      "pin a flwr release from 1.27 on")


def supernode_family(flags: CommandFlags) -> str:
    if flags.usable("--host") and flags.usable("--port"):
        return HTTP
    if flags.usable("--clientappio-api-address"):
        return GRPC
    raise DeployError("flower-supernode has neither --host/--port nor --clientappio-api-address; "
                      "pin a flwr release from 1.27 on")


def superlink_listen_port(settings: dict, flags: FlwrFlags) -> int:
    """Return the port the SuperLink process itself listens on for SuperNodes.

    With TLS on the HTTP family nginx takes the public port and the SuperLink
    sits behind it on loopback. The gRPC family has a Fleet-only listener of
    its own, which takes the public port directly.
    """
    if settings["melody_insecure"] or superlink_family(flags.superlink) == GRPC:
        return settings["melody_superlink_port"]
    return settings["melody_superlink_internal_port"]


def superlink_options(settings: dict, flags: FlwrFlags, tls: ServerTls | None) -> list[Option]:
    """Return the flower-superlink options for the pinned release.

    Without `melody_insecure`, `tls` names the certificate files on the host.
    """
    insecure = settings["melody_insecure"]
    state_dir = settings["melody_superlink_state_dir"]
    log_dir = settings["melody_superlink_log_dir"]
    public_host = settings["melody_superlink_listen_host"]
    port = settings["melody_superlink_port"]
    internal_port = settings["melody_superlink_internal_port"]

    if superlink_family(flags.superlink) == HTTP:
        # With TLS, nginx publishes the Fleet API, so the SuperLink listens on loopback.
        host, listen = (public_host, port) if insecure else ("127.0.0.1", internal_port)
        options = [Option("--host", host), Option("--port", str(listen))]
    else:
        # The Control API gets a listener of its own, on loopback unless insecure, and
        # the ServerAppIo API serves only the SuperLink's own SuperExec.
        control_host = public_host if insecure else "127.0.0.1"
        options = [
            Option("--fleet-api-address", f"{public_host}:{port}"),
            Option("--control-api-address", f"{control_host}:{internal_port}"),
            Option("--serverappio-api-address", f"127.0.0.1:{settings['melody_superlink_serverappio_port']}",
                   setting="melody_superlink_serverappio_port"),
        ]

    options += [
        Option("--database", f"{state_dir}/state.db"),
        Option("--log-file", f"{log_dir}/superlink.log", setting="melody_superlink_log_dir"),
        Option("--log-rotation-interval-hours", str(settings["melody_log_rotation_hours"]),
               setting="melody_log_rotation_hours"),
        Option("--log-rotation-backup-count", str(settings["melody_log_backup_count"]),
               setting="melody_log_backup_count"),
        # Hosts in a TRE are offline and must run only what was installed.
        # flwr 1.27 has no such flag and, read from its source, no run-time installation.
        Option("--disable-runtime-dependency-installation", required=False),
        Option("--isolation", "subprocess"),
    ]
    if settings.get("melody_superlink_storage_dir") is not None:
        options.append(Option("--storage-dir", settings["melody_superlink_storage_dir"],
                              setting="melody_superlink_storage_dir"))
    if insecure:
        options.append(Option("--insecure", setting="melody_insecure"))
    else:
        # SuperNode authentication refuses to start without TLS on the SuperLink itself.
        options += [
            Option("--ssl-certfile", tls.certificate, setting="melody_insecure"),
            Option("--ssl-keyfile", tls.key, setting="melody_insecure"),
            Option("--ssl-ca-certfile", tls.ca_certificate, setting="melody_insecure"),
            Option("--enable-supernode-auth", setting="melody_insecure"),
        ]
    return options


def supernode_options(settings: dict, flags: FlwrFlags, node_config: str, root_certificates: str,
                      auth_private_key: str) -> list[Option]:
    """Return the flower-supernode options for the pinned release.

    `node_config` is already quoted for a systemd command line. Without
    `melody_insecure`, the SuperNode checks the SuperLink's certificate
    against `root_certificates` and signs its requests with `auth_private_key`.
    """
    listen_host = settings["melody_supernode_listen_host"]
    port = settings["melody_supernode_port"]
    options = [Option("--superlink", settings["melody_superlink_address"])]
    if supernode_family(flags.supernode) == HTTP:
        options += [Option("--host", listen_host), Option("--port", str(port))]
    else:
        options.append(Option("--clientappio-api-address", f"{listen_host}:{port}"))
    options += [
        Option("--node-config", node_config, setting="melody_node_config"),
        Option("--isolation", "subprocess"),
    ]
    if settings["melody_insecure"]:
        options.append(Option("--insecure", setting="melody_insecure"))
    else:
        options += [
            Option("--root-certificates", root_certificates, setting="melody_insecure"),
            Option("--auth-supernode-private-key", auth_private_key, setting="melody_insecure"),
        ]
    return options


def option_problems(command: str, version: str, options: list[Option], flags: CommandFlags) -> list[str]:
    """Return one line per requested option that `command` of flwr `version` does not accept."""
    problems = []
    for option in options:
        if not option.required or flags.usable(option.flag):
            continue
        state = "marks as deprecated" if option.flag in flags.accepted else "does not accept"
        if option.setting is not None:
            problems.append(
                f"setting '{option.setting}' needs {command} {option.flag}, which flwr {version} {state}; "
                f"change the setting, or pin a flwr release that accepts {option.flag}"
            )
        else:
            problems.append(
                f"{command} of flwr {version} {state} {option.flag}, which this deploy needs; "
                f"pin a flwr release that accepts it, such as 1.27.0 or 1.42.0"
            )
    return problems


def render_args(command: str, version: str, options: list[Option], flags: CommandFlags) -> list[str]:
    """Return the arguments, one option with its value per item, that the release accepts.

    Raise DeployError when a requested option is not accepted.
    """
    problems = option_problems(command, version, options, flags)
    if problems:
        raise DeployError("; ".join(problems))
    args = []
    for option in options:
        if flags.usable(option.flag):
            args.append(option.text())
        else:
            logger.info("flwr %s: %s has no %s; the option is left out", version, command, option.flag)
    return args
