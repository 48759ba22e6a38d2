"""pyinfra inventory of the local lab, read from the state file `melody_lab up` writes.

Usage: `pyinfra inventories/lab.py deploy/superlink.py` (and deploy/supernode.py).
The lab runs the secure default: TLS with a CA generated into the lab's
folder, SuperNode authentication, and a Control API that only this machine
(the lab bridge's address) reaches, through an SSH tunnel with the lab's
researcher key.
"""

import ipaddress
import json
import os
import subprocess
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
lab_dir = state_file.parent

# This machine plays the researcher: it owns the lab's researcher key and
# reaches the lab hosts from the bridge address, the subnet's first address.
researcher_key = lab_dir / "researcher" / "id_ed25519"
if not researcher_key.exists():
    researcher_key.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "melody-lab-researcher",
                    "-f", str(researcher_key)], check=True)
researcher_address = ipaddress.ip_network(lab["subnet"])[1]

# The lab owns its SSH client key and known_hosts file, so host keys are
# still checked strictly.
connection = {
    "ssh_user": "root",
    "ssh_key": lab["ssh_key"],
    "ssh_known_hosts_file": lab["known_hosts"],
    "ssh_strict_host_key_checking": "yes",
}
federation = {
    "melody_wheelhouse_cache": str(repo / ".cache" / "wheelhouse"),
}
control_api = {
    "melody_tls_dir": str(lab_dir / "tls"),
    "melody_researcher_networks": [f"{researcher_address}/32"],
    "melody_researcher_ssh_keys": [researcher_key.with_suffix(".pub").read_text().strip()],
}

superlink = [
    (entry["name"], {**connection, **federation, **control_api, "ssh_hostname": entry["address"]})
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
