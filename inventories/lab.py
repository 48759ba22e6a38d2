"""pyinfra inventory of the local lab, read from the state file `melody_lab up` writes.

Usage: `pyinfra inventories/lab.py deploy/superlink.py` (and deploy/supernode.py).
The lab's hosts are throw-away nspawn containers on this machine, so this
inventory turns TLS off with `melody_insecure`.
"""

import json
import os
from pathlib import Path

repo = Path(__file__).resolve().parent.parent
state_file = Path(os.environ.get("MELODY_LAB_DIR", repo / ".lab")) / "state.json"
if not state_file.exists():
    raise SystemExit(
        f"lab state {state_file} not found: start the lab first with "
        f"`.venv/bin/python -m melody_lab up`, or, for a copy of this inventory "
        f"outside the repository, set MELODY_LAB_DIR to the lab's state folder "
        f"(the repository's .lab folder)"
    )
lab = json.loads(state_file.read_text())

# The lab owns its SSH client key and known_hosts file, so host keys are
# still checked strictly.
connection = {
    "ssh_user": "root",
    "ssh_key": lab["ssh_key"],
    "ssh_known_hosts_file": lab["known_hosts"],
    "ssh_strict_host_key_checking": "yes",
}
federation = {
    "melody_insecure": True,
    "melody_wheelhouse_cache": str(repo / ".cache" / "wheelhouse"),
}

superlink = [
    (entry["name"], {**connection, **federation, "ssh_hostname": entry["address"]})
    for entry in lab["hosts"]
    if entry["role"] == "superlink"
]
supernodes = [
    (
        entry["name"],
        {
            **connection,
            **federation,
            "ssh_hostname": entry["address"],
            "melody_partition_id": entry["partition_id"],
            "melody_data_dir": entry["data_dir"],
        },
    )
    for entry in lab["hosts"]
    if entry["role"] == "supernode"
]
