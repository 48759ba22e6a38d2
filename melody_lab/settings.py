"""Defaults of the lab, each set here once, and the paths it reads and writes."""

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

# The one place that sets the lab network. `up --subnet` overrides the subnet
# for a single lab, and the state file records what was used.
DEFAULT_SUBNET = "10.231.76.0/24"
BRIDGE_NAME = "melodylab0"

DEFAULT_SUPERNODES = 2
MAX_SUPERNODES = 16

# Folder on each supernode host that receives its data shard, placed as a
# hospital's data export would place it.
HOST_DATA_DIR = "/srv/melody/data"

# Name of the cgroup folder, under each cgroup hierarchy, that contains one
# child cgroup per host.
CGROUP_PARENT = "melody-lab"


def state_dir() -> Path:
    """Return the folder for the running lab: rootfs, overlays, keys and logs."""
    return Path(os.environ.get("MELODY_LAB_DIR", REPO_ROOT / ".lab")).resolve()


def cache_dir() -> Path:
    """Return the folder that keeps built root filesystem archives between labs."""
    return Path(os.environ.get("MELODY_LAB_CACHE", REPO_ROOT / ".cache" / "lab")).resolve()


def default_dataset() -> Path:
    """Return the DermaMNIST folder beside the repository."""
    return (REPO_ROOT.parent / "shared" / "data" / "dermamnist28").resolve()
