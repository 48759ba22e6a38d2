"""Example pyinfra inventory for a real federation: copy it and fill in your hosts.

One SuperLink, and one SuperNode per Trusted Research Environment. Every
setting an operator may change is listed with its default; the README's
settings table explains each. Run, from the repository root:

    pyinfra inventories/tres.py deploy/superlink.py
    pyinfra inventories/tres.py deploy/supernode.py

The host names below are placeholders under the reserved `.example` domain.
"""

# ---------------------------------------------------------------------------
# WARNING: TLS is not set up by this release. Until it is, the services can
# only run with `melody_insecure = True`, which sends model updates in clear
# text and lets anyone who reaches the SuperLink's port submit runs. Do NOT
# connect real patient data to such a federation.
# ---------------------------------------------------------------------------

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
    # TLS off: see the warning above. Required to be True until TLS lands.
    "melody_insecure": True,
}

superlink = [
    (
        "superlink.melody.example",
        {
            **connection,
            **federation,
            # Address the SuperLink's HTTP API listens on.
            "melody_superlink_listen_host": "0.0.0.0",
            # Port SuperNodes and researchers connect to.
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
