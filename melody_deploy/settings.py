"""Every inventory setting a TRE operator may change, declared once.

Each setting is host data in a pyinfra inventory, with the `melody_` prefix.
The README's settings table is generated from this list
(`python -m melody_deploy.settings`), and a test keeps the two equal.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

# Roles that read a setting: every host, the SuperLink, or each SuperNode.
ALL = "all"
SUPERLINK = "superlink"
SUPERNODE = "supernode"

# Marks a setting that has no default and must be set in the inventory.
REQUIRED = object()


@dataclass(frozen=True)
class Setting:
    """One inventory setting: its key, default, type, role and meaning."""

    name: str
    default: Any
    kind: type | tuple[type, ...]
    role: str
    help: str
    choices: tuple[Any, ...] = ()
    # A valid value for error messages, for settings without a usable default.
    example: Any = None
    # The README's Default column, where the default value alone would mislead.
    default_text: str | None = None

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    @property
    def sample(self) -> Any:
        """Return a valid value to show in an error message, or None."""
        if self.example is not None:
            return self.example
        if self.required or isinstance(self.default, (tuple, dict)):
            return None
        return self.default


SETTINGS: tuple[Setting, ...] = (
    # Software installed on every host.
    Setting("melody_flwr_version", "1.42.0", str, ALL,
            "flwr release installed in the hosts' venv; every host of a federation runs the same one."),
    Setting("melody_torch_version", "2.13.0", str, ALL,
            "torch release installed beside flwr for the training app."),
    Setting("melody_torch_build", "cpu", str, ALL,
            "torch build for the hosts: `cpu` (small, no GPU) or `cuda` (NVIDIA GPUs, several GB).",
            choices=("cpu", "cuda")),
    Setting("melody_pip_download_args", (), (list, tuple), ALL,
            "Extra `pip download` arguments on the operator's machine, such as the index that serves CPU torch wheels."),
    Setting("melody_wheelhouse_cache", ".cache/wheelhouse", str, ALL,
            "Folder on the operator's machine where wheelhouses are built and kept, relative to where pyinfra runs."),
    Setting("melody_install_dir", "/opt/melody", str, ALL,
            "Folder on each host for the uploaded wheelhouses and the venvs."),
    Setting("melody_service_user", "melody", str, ALL,
            "System user and group that the services run as (created without a login shell)."),
    Setting("melody_insecure", False, bool, ALL,
            "Run without TLS, SuperNode authentication or the Fleet-only front: for a throw-away lab only, "
            "never with patient data. Set it the same on every host."),
    # The SuperLink.
    Setting("melody_superlink_listen_host", "0.0.0.0", str, SUPERLINK,
            "Address SuperNodes connect to: nginx's Fleet-only front, or with `melody_insecure` the SuperLink itself."),
    Setting("melody_superlink_port", 8000, int, SUPERLINK,
            "Port SuperNodes connect to, on `melody_superlink_listen_host`."),
    Setting("melody_superlink_state_dir", "/var/lib/melody-superlink", str, SUPERLINK,
            "Persistent folder for the SuperLink's state database and Flower home."),
    Setting("melody_superlink_log_dir", "/var/log/melody-superlink", str, SUPERLINK,
            "Folder for the SuperLink's rotated log file."),
    Setting("melody_log_rotation_hours", 24, int, SUPERLINK,
            "Hours between rotations of the SuperLink's log file."),
    Setting("melody_log_backup_count", 90, int, SUPERLINK,
            "Rotated SuperLink log files kept before the oldest is deleted."),
    # Each SuperNode.
    Setting("melody_superlink_address", None, (str, type(None)), SUPERNODE,
            "`HOST:PORT` of the SuperLink as this SuperNode reaches it; default: the inventory's SuperLink host and port.",
            example="superlink.example:8000"),
    Setting("melody_partition_id", REQUIRED, int, SUPERNODE,
            "Integer id of this site, unique in the federation; passed to the app as `partition-id`.",
            example=0),
    Setting("melody_data_dir", REQUIRED, str, SUPERNODE,
            "Absolute path of the site's image folder (with `labels.csv`); the service only reads it.",
            example="/srv/melody/data"),
    Setting("melody_supernode_listen_host", "127.0.0.1", str, SUPERNODE,
            "Address of the SuperNode's local Runtime API, used by its own ClientApp processes."),
    Setting("melody_supernode_port", 9094, int, SUPERNODE,
            "Port of the SuperNode's local Runtime API."),
    Setting("melody_supernode_state_dir", "/var/lib/melody-supernode", str, SUPERNODE,
            "Persistent folder for the SuperNode's Flower home (installed app bundles)."),
    Setting("melody_node_config", {}, dict, SUPERNODE,
            "Extra `--node-config` keys for the app, as a dict of strings, integers or floats."),
    # Audit records: the SuperLink's database backup.
    Setting("melody_superlink_backup_dir", "/var/backups/melody-superlink", str, SUPERLINK,
            "Folder on the SuperLink host for snapshots of its state database."),
    Setting("melody_superlink_backup_calendar", "daily", str, SUPERLINK,
            "systemd `OnCalendar=` schedule of the state database backup, such as `daily` or `*-*-* 02:00:00`."),
    Setting("melody_superlink_backup_count", 30, int, SUPERLINK,
            "Snapshots of the state database kept before the oldest is deleted."),
    # Security: TLS, SuperNode authentication and access to the Control API.
    Setting("melody_tls_dir", ".cache/tls", str, SUPERLINK,
            "Folder on the operator's machine for the CA and SuperLink certificate the deploy generates "
            "(keys mode 0600), relative to where pyinfra runs."),
    Setting("melody_tls_ca_cert", None, (str, type(None)), SUPERLINK,
            "Your own CA certificate (PEM file on the operator's machine); set it with the next two "
            "to use your certificates instead of generated ones.",
            example="/etc/melody-operator/ca.pem", default_text="none: generated"),
    Setting("melody_tls_server_cert", None, (str, type(None)), SUPERLINK,
            "Your own SuperLink certificate (PEM); its names must include every address SuperNodes use, "
            "`localhost` and `127.0.0.1`.",
            example="/etc/melody-operator/superlink.pem", default_text="none: generated"),
    Setting("melody_tls_server_key", None, (str, type(None)), SUPERLINK,
            "Unencrypted PEM private key of `melody_tls_server_cert`.",
            example="/etc/melody-operator/superlink.key", default_text="none: generated"),
    Setting("melody_tls_names", (), (list, tuple), SUPERLINK,
            "Extra DNS names or IP addresses for the generated SuperLink certificate."),
    Setting("melody_tls_valid_days", 365, int, SUPERLINK,
            "Days a generated SuperLink certificate is valid."),
    Setting("melody_tls_renew_days", 30, int, SUPERLINK,
            "A deploy renews a generated certificate (and warns about a supplied one) that expires "
            "within this many days."),
    Setting("melody_superlink_internal_port", 8001, int, SUPERLINK,
            "Loopback port of the SuperLink behind nginx (on flwr 1.27 and earlier: of its Control API "
            "listener); researchers' SSH tunnels reach the Control API there."),
    Setting("melody_control_user", "melody-control", str, SUPERLINK,
            "System user on the SuperLink host that researchers' SSH tunnels log in as; it may only "
            "forward to the Control API."),
    Setting("melody_researcher_networks", (), (list, tuple), SUPERLINK,
            "IP networks (CIDR) that researchers' SSH tunnels may come from, such as `['10.20.0.0/24']`."),
    Setting("melody_researcher_ssh_keys", (), (list, tuple), SUPERLINK,
            "Researchers' SSH public keys (OpenSSH lines) that may open a tunnel to the Control API."),
    # Operating the federation: verify and teardown.
    Setting("melody_verify_min_free_mb", 1024, int, ALL,
            "Free space in MiB that `melody_deploy.verify` expects on the file systems of the state and log folders."),
    Setting("melody_teardown_purge", False, bool, ALL,
            "Let `deploy/teardown.py` also delete the state folders (the SuperLink's database) and the SuperLink's logs."),
    # flwr versions: the gRPC command line family (flwr 1.27 and earlier), upgrades and retired venvs.
    Setting("melody_superlink_serverappio_port", 9091, int, SUPERLINK,
            "Loopback port of the SuperLink's ServerAppIo API on flwr releases with `--serverappio-api-address` "
            "(1.27 and earlier); later releases serve it on the SuperLink's own port."),
    Setting("melody_superlink_storage_dir", None, (str, type(None)), SUPERLINK,
            "Folder for the SuperLink's Flower File System (`--storage-dir`, flwr 1.28 and earlier only); "
            "unset: flwr's default.",
            example="/var/lib/melody-superlink/ffs", default_text="none: flwr's default"),
    Setting("melody_flwr_staged_upgrade", False, bool, ALL,
            "Allow hosts of one federation on different flwr major.minor versions while you upgrade them "
            "one by one; set it on every host, and back to False once all hosts run the new version."),
    Setting("melody_venv_retire_after", 2, int, ALL,
            "Successful flwr upgrades after which a host deletes an older venv and its wheelhouse; "
            "the venv in use and the rollback target are always kept."),
)

BY_NAME: dict[str, Setting] = {setting.name: setting for setting in SETTINGS}


def settings_for_role(role: str) -> tuple[Setting, ...]:
    """Return the settings that a host of `role` reads."""
    return tuple(s for s in SETTINGS if s.role in (ALL, role))


def format_type(setting: Setting) -> str:
    kinds = setting.kind if isinstance(setting.kind, tuple) else (setting.kind,)
    names = [kind.__name__ for kind in kinds if kind is not type(None)]
    text = " or ".join(names)
    if setting.choices:
        text += ": " + ", ".join(f"`{choice}`" for choice in setting.choices)
    return text


def format_default(setting: Setting) -> str:
    if setting.default_text is not None:
        return setting.default_text
    if setting.required:
        return "required"
    if setting.default is None:
        return "derived"
    if isinstance(setting.default, tuple):
        return f"`{list(setting.default)!r}`"
    return f"`{setting.default!r}`"


def markdown_table() -> str:
    """Render the settings as the Markdown table that the README carries."""
    lines = [
        "| Setting | Hosts | Type | Default | Meaning |",
        "| --- | --- | --- | --- | --- |",
    ]
    for setting in SETTINGS:
        lines.append(
            f"| `{setting.name}` | {setting.role} | {format_type(setting)} "
            f"| {format_default(setting)} | {setting.help} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(markdown_table())
