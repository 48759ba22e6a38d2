"""Defaults of the lab, each set here once, and the paths it reads and writes."""

import os
import re
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

# Several labs can run side by side on one machine, each from its own checkout
# with its own MELODY_LAB_INSTANCE (one to four lowercase letters or digits)
# and MELODY_LAB_SUBNET. The instance keeps the bridge, cgroups and machine
# names of the labs apart. Unset, the names below are used as they are.
INSTANCE = os.environ.get("MELODY_LAB_INSTANCE", "")
if INSTANCE and not re.fullmatch(r"[a-z0-9]{1,4}", INSTANCE):
    raise SystemExit(f"MELODY_LAB_INSTANCE={INSTANCE!r} is invalid: use one to four lowercase letters or digits")

# The one place that sets the lab network. `up --subnet` overrides the subnet
# for a single lab, and the state file records what was used.
DEFAULT_SUBNET = os.environ.get("MELODY_LAB_SUBNET", "10.231.76.0/24")
BRIDGE_NAME = f"melodylab-{INSTANCE}" if INSTANCE else "melodylab0"

DEFAULT_SUPERNODES = 2
MAX_SUPERNODES = 16

# Folder on each supernode host that receives its data shard, placed as a
# hospital's data export would place it.
HOST_DATA_DIR = "/srv/melody/data"

# Name of the cgroup folder, under each cgroup hierarchy, that contains one
# child cgroup per host.
CGROUP_PARENT = f"melody-lab-{INSTANCE}" if INSTANCE else "melody-lab"


def machine_name(host: str) -> str:
    """Return the systemd-nspawn machine name of lab host `host` in this instance."""
    return f"{INSTANCE}-{host}" if INSTANCE else host


def state_dir() -> Path:
    """Return the folder for the running lab: rootfs, overlays, keys and logs."""
    return Path(os.environ.get("MELODY_LAB_DIR", REPO_ROOT / ".lab")).resolve()


def cache_dir() -> Path:
    """Return the folder that keeps built root filesystem archives between labs."""
    return Path(os.environ.get("MELODY_LAB_CACHE", REPO_ROOT / ".cache" / "lab")).resolve()


def default_dataset() -> Path:
    """Return the DermaMNIST folder beside the repository."""
    return (REPO_ROOT.parent / "shared" / "data" / "dermamnist28").resolve()
