"""Example pyinfra inventory for a real federation: copy it and fill in your hosts.

One SuperLink, and one SuperNode per Trusted Research Environment. Every
setting an operator may change is listed with its default; the README's
settings table explains each. Run, from the repository root:

    pyinfra inventories/tres.py deploy/superlink.py
    pyinfra inventories/tres.py deploy/supernode.py

The host names below are placeholders under the reserved `.example` domain.
"""

# Secure by default: the deploy creates a CA and a SuperLink certificate in
# melody_tls_dir (or uses yours), registers each SuperNode's key with the
# SuperLink, and publishes only the Fleet API to SuperNodes. Researchers reach
# the Control API through an SSH tunnel from melody_researcher_networks.

# SSH connection of pyinfra: an admin account with sudo, and strict
# host-key checking against a known_hosts file you keep.
connection = {
    "ssh_user": "melody-admin",
    "_sudo": True,
    "ssh_known_hosts_file": "~/.ssh/known_hosts",
    "ssh_strict_host_key_checking": "yes",
}

# Settings every host reads; the values shown are the defaults.
federation = {
    # flwr release installed in the hosts' venv; every host runs the same one.
    "melody_flwr_version": "1.42.0",
    # torch release installed beside flwr for the training app.
    "melody_torch_version": "2.13.0",
    # torch build: "cpu" or "cuda" (for SuperNodes with NVIDIA GPUs).
    "melody_torch_build": "cpu",
    # Extra `pip download` arguments on the operator's machine, for example
    # ["--extra-index-url", "<your mirror of the CPU torch wheels>"].
    "melody_pip_download_args": [],
    # Where the operator's machine builds and keeps wheelhouses.
    "melody_wheelhouse_cache": ".cache/wheelhouse",
    # Folder on each host for the uploaded wheelhouses and venvs.
    "melody_install_dir": "/opt/melody",
    # System user and group the services run as.
    "melody_service_user": "melody",
    # True turns TLS, SuperNode authentication and the Fleet-only front off:
    # for a throw-away lab only, never with patient data.
    "melody_insecure": False,
    # Free MiB that `python -m melody_deploy.verify` expects for state and logs.
    "melody_verify_min_free_mb": 1024,
    # True lets deploy/teardown.py delete the state database and logs too.
    "melody_teardown_purge": False,
    # True while you upgrade flwr host by host (docs/upgrades.md), on every host.
    "melody_flwr_staged_upgrade": False,
    # Upgrades after which an older venv is deleted (never the rollback target).
    "melody_venv_retire_after": 2,
}

superlink = [
    (
        "superlink.melody.example",
        {
            **connection,
            **federation,
            # Address and port SuperNodes connect to (nginx, Fleet API only).
            "melody_superlink_listen_host": "0.0.0.0",
            "melody_superlink_port": 8000,
            # Persistent folder for the state database and Flower home.
            "melody_superlink_state_dir": "/var/lib/melody-superlink",
            # Folder for the rotated log file.
            "melody_superlink_log_dir": "/var/log/melody-superlink",
            # Hours between log rotations, and rotated files kept.
            "melody_log_rotation_hours": 24,
            "melody_log_backup_count": 90,
            # Snapshots of the state database: folder, systemd schedule, and how many are kept.
            "melody_superlink_backup_dir": "/var/backups/melody-superlink",
            "melody_superlink_backup_calendar": "daily",
            "melody_superlink_backup_count": 30,
            # Security: TLS, SuperNode authentication and the Control API.
            # Folder on the operator's machine for the generated CA and
            # certificate; its keys are mode 0600. Keep it out of git.
            "melody_tls_dir": ".cache/tls",
            # Your own CA, certificate and key instead (all three or none).
            "melody_tls_ca_cert": None,
            "melody_tls_server_cert": None,
            "melody_tls_server_key": None,
            # Extra names for the generated certificate, such as a DNS alias.
            "melody_tls_names": [],
            # Validity of a generated certificate, and the renewal window.
            "melody_tls_valid_days": 365,
            "melody_tls_renew_days": 30,
            # Loopback port of the SuperLink behind nginx (Control API).
            "melody_superlink_internal_port": 8001,
            # Account researchers' SSH tunnels log in as.
            "melody_control_user": "melody-control",
            # Where researchers' tunnels may come from, and their keys, e.g.
            # ["10.20.0.0/24"] and ["ssh-ed25519 AAAA... alice@lab"].
            "melody_researcher_networks": [],
            "melody_researcher_ssh_keys": [],
            # flwr 1.27 and earlier only: the loopback ServerAppIo port, and a
            # Flower File System folder (None: flwr's default).
            "melody_superlink_serverappio_port": 9091,
            "melody_superlink_storage_dir": None,
        },
    ),
]

# Settings each SuperNode reads; the values shown are the defaults.
supernode_defaults = {
    # Local Runtime API of the SuperNode, used by its own ClientApp processes.
    "melody_supernode_listen_host": "127.0.0.1",
    "melody_supernode_port": 9094,
    # Persistent folder for the SuperNode's Flower home.
    "melody_supernode_state_dir": "/var/lib/melody-supernode",
    # Extra `--node-config` keys for the app.
    "melody_node_config": {},
}

supernodes = [
    (
        "supernode.tayside.example",
        {
            **connection,
            **federation,
            **supernode_defaults,
            # Unique integer id of this site in the federation.
            "melody_partition_id": 0,
            # The site's exported images with labels.csv; read, never written.
            "melody_data_dir": "/srv/melody/data",
            # Default: the SuperLink host above and its port.
            "melody_superlink_address": "superlink.melody.example:8000",
        },
    ),
    (
        "supernode.oxford.example",
        {
            **connection,
            **federation,
            **supernode_defaults,
            "melody_partition_id": 1,
            "melody_data_dir": "/srv/melody/data",
            "melody_superlink_address": "superlink.melody.example:8000",
        },
    ),
]
