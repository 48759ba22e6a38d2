"""Paths on the hosts and the rendered systemd units for both roles.

The values are computed here and the Jinja2 templates only lay them out, so
the unit tests render exactly what the deploy uploads.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import jinja2

from melody_audit.session import EXIT_NOT_REGISTERED

from . import flwr_cli, flwr_flags
from .flwr_flags import FlwrFlags
from .preflight import ResolvedHost

TEMPLATES_DIR = Path(__file__).resolve().parent.parent / "templates"
UNIT_DIR = "/etc/systemd/system"
SUPERLINK_UNIT = "melody-superlink.service"
SUPERNODE_UNIT = "melody-supernode.service"

# Environment shared by both services. Hosts in a TRE must not call out:
# telemetry and the update check are on in flwr unless turned off here.
OFFLINE_ENVIRONMENT = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
}


# The SuperNode's egress record, inside its state folder so the sandbox lets it write.
AUDIT_SUBDIR = "audit"
# Seconds a SuperNode may take to register with the SuperLink before systemd
# counts the start as failed.
SUPERNODE_START_TIMEOUT = 120

# Paths of the TLS files on the hosts: the CA certificate on every host, the SuperLink's certificate and key (readable by root and the service
# group only) on the SuperLink host.
REMOTE_TLS_DIR = "/etc/melody/tls"
REMOTE_TLS = flwr_cli.ServerTls(
    ca_certificate=f"{REMOTE_TLS_DIR}/ca.pem",
    certificate=f"{REMOTE_TLS_DIR}/superlink.pem",
    key=f"{REMOTE_TLS_DIR}/superlink.key",
)

# Seconds before systemd restarts a failed service. A SuperNode that crashed
# reconnects at once (melody_audit.session), so it restarts quickly. A
# SuperNode whose key the SuperLink does not know exits with
# SUPERNODE_NOT_REGISTERED_STATUS, and the unit does not restart it.
SUPERLINK_RESTART_SEC = 5
SUPERNODE_RESTART_SEC = 1
SUPERNODE_NOT_REGISTERED_STATUS = EXIT_NOT_REGISTERED


def supernode_key_path(settings: dict) -> str:
    """Return the path of the SuperNode's authentication key, generated on its host."""
    return f"{settings['melody_supernode_state_dir']}/auth/supernode-key"


@dataclass(frozen=True)
class HostPaths:
    """Paths of the deploy's files on one host."""

    wheelhouse: str
    venv: str
    venv_marker: str


def host_paths(settings: dict, wheelhouse_id: str) -> HostPaths:
    install_dir = settings["melody_install_dir"]
    name = f"flwr-{settings['melody_flwr_version']}-{wheelhouse_id}"
    venv = f"{install_dir}/venvs/{name}"
    return HostPaths(
        wheelhouse=f"{install_dir}/wheelhouses/{wheelhouse_id}",
        venv=venv,
        venv_marker=f"{venv}/.melody-installed",
    )


def node_config_argument(settings: dict) -> str:
    """Return the `--node-config` value, quoted for a systemd command line.

    Flower splits the value on spaces and parses each `key=value` as TOML, so
    strings are double-quoted inside a single-quoted systemd word. Preflight
    has already limited every value to characters that need no escaping.
    """
    pairs = {
        "partition-id": settings["melody_partition_id"],
        "num-partitions": settings["melody_num_partitions"],
        "data-dir": settings["melody_data_dir"],
        **settings["melody_node_config"],
    }
    rendered = []
    for key, value in pairs.items():
        rendered.append(f'{key}="{value}"' if isinstance(value, str) else f"{key}={value}")
    return "'" + " ".join(rendered) + "'"


def environment(settings: dict, venv: str, flwr_home: str) -> dict[str, str]:
    # flower-superlink and flower-supernode start `flower-superexec` found on
    # PATH, so the venv's bin folder must come first.
    return {
        "PATH": f"{venv}/bin:/usr/local/bin:/usr/bin:/bin",
        "FLWR_HOME": flwr_home,
        **OFFLINE_ENVIRONMENT,
    }


def protect_home(data_dir: str) -> str:
    # ProtectHome=yes would hide a data folder under a home folder entirely,
    # and ReadOnlyPaths cannot bring it back.
    homes = ("/home/", "/root/", "/run/user/")
    return "read-only" if (data_dir + "/").startswith(homes) else "yes"


def release_flags(settings: dict, flags: FlwrFlags | None) -> FlwrFlags:
    """Return `flags`, or probe those of the host's pinned flwr (cached in the wheelhouse cache)."""
    if flags is not None:
        return flags
    return flwr_flags.probe(settings["melody_flwr_version"], flags_cache_dir(settings))


def flags_cache_dir(settings: dict) -> Path:
    return Path(settings["melody_wheelhouse_cache"]).resolve() / "flwr-flags"


def storage_dirs(settings: dict) -> list[str]:
    """Return the SuperLink's Flower File System folder, when a setting names one."""
    storage_dir = settings.get("melody_superlink_storage_dir")
    return [] if storage_dir is None else [storage_dir]


def superlink_args(settings: dict, flags: FlwrFlags) -> list[str]:
    tls = None if settings["melody_insecure"] else REMOTE_TLS
    options = flwr_cli.superlink_options(settings, flags, tls)
    return flwr_cli.render_args("flower-superlink", flags.version, options, flags.superlink)


def supernode_args(settings: dict, flags: FlwrFlags) -> list[str]:
    options = flwr_cli.supernode_options(
        settings, flags, node_config_argument(settings), REMOTE_TLS.ca_certificate, supernode_key_path(settings),
    )
    return flwr_cli.render_args("flower-supernode", flags.version, options, flags.supernode)


def superlink_context(host: ResolvedHost, paths: HostPaths, flags: FlwrFlags | None = None) -> dict:
    settings = host.settings
    flags = release_flags(settings, flags)
    state_dir = settings["melody_superlink_state_dir"]
    log_dir = settings["melody_superlink_log_dir"]
    insecure = settings["melody_insecure"]
    read_write_paths = [state_dir, log_dir, *storage_dirs(settings)]

    # With TLS on the HTTP family, nginx publishes the Fleet API and the
    # SuperLink itself listens on loopback only, so it talks to no other
    # address. The gRPC family's own Fleet listener takes SuperNodes directly.
    grpc = flwr_cli.superlink_family(flags.superlink) == flwr_cli.GRPC
    if insecure:
        ip_address_allow, ip_address_note = [], "without TLS (melody_insecure) the deploy does not restrict which addresses this service talks to"
    elif grpc:
        ip_address_allow = []
        ip_address_note = ("on flwr releases with a Fleet listener of their own (1.27 and earlier), "
                           "SuperNodes connect to this service directly from any address")
    else:
        ip_address_allow, ip_address_note = ["localhost"], ""
    return {
        "description": "MELODY Flower SuperLink",
        "user": settings["melody_service_user"],
        "executable": f"{paths.venv}/bin/flower-superlink",
        "args": superlink_args(settings, flags),
        "environment": environment(settings, paths.venv, f"{state_dir}/flwr"),
        "working_directory": state_dir,
        "read_write_paths": read_write_paths,
        "read_only_paths": [],
        "protect_home": "yes",
        "service_type": "simple",
        "start_lines": [],
        "ip_address_allow": ip_address_allow,
        "ip_address_note": ip_address_note,
        "restart_sec": SUPERLINK_RESTART_SEC,
        "insecure": insecure,
        "flwr_version": settings["melody_flwr_version"],
    }


def supernode_context(host: ResolvedHost, paths: HostPaths, egress_addresses: tuple[str, ...] = (),
                      flags: FlwrFlags | None = None) -> dict:
    """Return the SuperNode unit's values; with TLS it may reach `egress_addresses` and loopback only."""
    settings = host.settings
    flags = release_flags(settings, flags)
    state_dir = settings["melody_supernode_state_dir"]
    insecure = settings["melody_insecure"]
    # The SuperNode's own ClientApp processes reach its Runtime API on loopback.
    ip_address_allow = [] if insecure else ["localhost", *egress_addresses]
    return {
        "description": f"MELODY Flower SuperNode (partition {settings['melody_partition_id']})",
        "user": settings["melody_service_user"],
        **audited_supernode(paths.venv, state_dir),
        "args": supernode_args(settings, flags),
        "working_directory": state_dir,
        "read_write_paths": [state_dir],
        "read_only_paths": [settings["melody_data_dir"]],
        "protect_home": protect_home(settings["melody_data_dir"]),
        "ip_address_allow": ip_address_allow,
        "ip_address_note": "without TLS (melody_insecure) the deploy does not restrict which addresses this service talks to",
        "restart_sec": SUPERNODE_RESTART_SEC,
        "restart_prevent_exit_status": SUPERNODE_NOT_REGISTERED_STATUS,
        "insecure": insecure,
        "flwr_version": settings["melody_flwr_version"],
    }


def audited_supernode(venv: str, state_dir: str) -> dict:
    """Return the unit values that run the SuperNode under melody_audit's launcher.

    The launcher records every reply message in `state_dir`/audit and notifies
    systemd (Type=notify) that the service is ready only once it has
    registered with the SuperLink; until then `systemctl start` waits, up to
    the start timeout, after which Restart= tries again.
    """
    return {
        "executable": f"{venv}/bin/python -m melody_audit.supernode",
        "environment": {
            **environment({}, venv, f"{state_dir}/flwr"),
            "MELODY_AUDIT_DIR": f"{state_dir}/{AUDIT_SUBDIR}",
        },
        "service_type": "notify",
        "start_lines": [f"TimeoutStartSec={SUPERNODE_START_TIMEOUT}"],
    }


def render(template_name: str, context: dict) -> str:
    environment_ = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES_DIR),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,
    )
    return environment_.get_template(template_name).render(**context)


def render_superlink_unit(host: ResolvedHost, paths: HostPaths, flags: FlwrFlags | None = None) -> str:
    return render(f"{SUPERLINK_UNIT}.j2", superlink_context(host, paths, flags))


def render_supernode_unit(host: ResolvedHost, paths: HostPaths, egress_addresses: tuple[str, ...] = (),
                          flags: FlwrFlags | None = None) -> str:
    return render(f"{SUPERNODE_UNIT}.j2", supernode_context(host, paths, egress_addresses, flags))
