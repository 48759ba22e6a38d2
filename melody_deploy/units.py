"""Paths on the hosts and the rendered systemd units for both roles.

The values are computed here and the Jinja2 templates only lay them out, so
the unit tests render exactly what the deploy uploads.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import jinja2

from . import flwr_cli
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

# Seconds before systemd restarts a failed service. A SuperNode waits longer:
# the usual cause is a rejection by the SuperLink that a retry will not fix.
SUPERLINK_RESTART_SEC = 5
SUPERNODE_RESTART_SEC = 30


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


def superlink_context(host: ResolvedHost, paths: HostPaths) -> dict:
    settings = host.settings
    state_dir = settings["melody_superlink_state_dir"]
    log_dir = settings["melody_superlink_log_dir"]
    insecure = settings["melody_insecure"]
    # With TLS, nginx publishes the Fleet API and the SuperLink itself listens
    # on loopback only, so it talks to no other address.
    if insecure:
        listen_host, port, ip_address_allow = settings["melody_superlink_listen_host"], settings["melody_superlink_port"], []
    else:
        listen_host, port, ip_address_allow = "127.0.0.1", settings["melody_superlink_internal_port"], ["localhost"]
    args = flwr_cli.superlink_args(
        listen_host=listen_host,
        port=port,
        database=f"{state_dir}/state.db",
        log_file=f"{log_dir}/superlink.log",
        log_rotation_hours=settings["melody_log_rotation_hours"],
        log_backup_count=settings["melody_log_backup_count"],
        insecure=insecure,
        tls=None if insecure else REMOTE_TLS,
    )
    return {
        "description": "MELODY Flower SuperLink",
        "user": settings["melody_service_user"],
        "executable": f"{paths.venv}/bin/flower-superlink",
        "args": args,
        "environment": environment(settings, paths.venv, f"{state_dir}/flwr"),
        "working_directory": state_dir,
        "read_write_paths": [state_dir, log_dir],
        "read_only_paths": [],
        "protect_home": "yes",
        "service_type": "simple",
        "start_lines": [],
        "ip_address_allow": ip_address_allow,
        "restart_sec": SUPERLINK_RESTART_SEC,
        "insecure": insecure,
        "flwr_version": settings["melody_flwr_version"],
    }


def supernode_context(host: ResolvedHost, paths: HostPaths, egress_addresses: tuple[str, ...] = ()) -> dict:
    """Return the SuperNode unit's values; with TLS it may reach `egress_addresses` and loopback only."""
    settings = host.settings
    state_dir = settings["melody_supernode_state_dir"]
    insecure = settings["melody_insecure"]
    args = flwr_cli.supernode_args(
        superlink_address=settings["melody_superlink_address"],
        listen_host=settings["melody_supernode_listen_host"],
        port=settings["melody_supernode_port"],
        node_config=node_config_argument(settings),
        insecure=insecure,
        root_certificates=REMOTE_TLS.ca_certificate,
        auth_private_key=supernode_key_path(settings),
    )
    # The SuperNode's own ClientApp processes reach its Runtime API on loopback.
    ip_address_allow = [] if insecure else ["localhost", *egress_addresses]
    return {
        "description": f"MELODY Flower SuperNode (partition {settings['melody_partition_id']})",
        "user": settings["melody_service_user"],
        **audited_supernode(paths.venv, state_dir),
        "args": args,
        "working_directory": state_dir,
        "read_write_paths": [state_dir],
        "read_only_paths": [settings["melody_data_dir"]],
        "protect_home": protect_home(settings["melody_data_dir"]),
        "ip_address_allow": ip_address_allow,
        "restart_sec": SUPERNODE_RESTART_SEC,
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


def render_superlink_unit(host: ResolvedHost, paths: HostPaths) -> str:
    return render(f"{SUPERLINK_UNIT}.j2", superlink_context(host, paths))


def render_supernode_unit(host: ResolvedHost, paths: HostPaths, egress_addresses: tuple[str, ...] = ()) -> str:
    return render(f"{SUPERNODE_UNIT}.j2", supernode_context(host, paths, egress_addresses))
