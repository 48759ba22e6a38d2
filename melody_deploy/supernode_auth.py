"""SuperNode authentication: a key pair made on each SuperNode, its public key registered.

The private key is generated on the SuperNode host and never leaves it. The
deploy reads only the public key and registers it with the SuperLink, on
the SuperLink host, through the Control API on loopback.
"""

from __future__ import annotations

import shlex

from pyinfra import host as current_host
from pyinfra import inventory
from pyinfra.api import FactBase, OperationError, deploy
from pyinfra.operations import python, server

from .control_access import register_script_path
from .plan import HostPlan
from .units import SUPERNODE_UNIT, supernode_key_path

# The Control API's name for a SuperNode's key: an OpenSSH ECDSA key on a NIST
# curve without a passphrase (flwr 1.42 rejects ed25519).
KEY_TYPE = "ecdsa-sha2-nistp256"

GENERATE_KEY = """\
import os, sys
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
path = sys.argv[1]
key = ec.generate_private_key(ec.SECP256R1())
private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                            serialization.NoEncryption())
public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
descriptor = os.open(path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
with os.fdopen(descriptor, "wb") as handle:
    handle.write(private)
with open(path + ".pub", "wb") as handle:
    handle.write(public + b"\\n")
os.replace(path + ".tmp", path)
"""

# Reads the public keys of registered SuperNodes from the SuperLink's state
# database, read-only. NOTE: this reads flwr 1.42's `node` table directly
# because `flwr supernode list` does not show keys. A changed schema makes the
# fact empty, and the deploy then registers again, which is harmless.
REGISTERED_KEYS = """\
import sqlite3, sys
try:
    connection = sqlite3.connect("file:" + sys.argv[1] + "?mode=ro", uri=True)
    rows = connection.execute(
        "SELECT public_key FROM node WHERE public_key IS NOT NULL AND status != 'unregistered'")
    for (key,) in rows:
        print(bytes(key).decode().replace("\\n", "|"))
except sqlite3.Error:
    pass
"""


class SupernodePublicKey(FactBase):
    """
    The SuperNode's OpenSSH public key line, or None before it is generated.

    .. code:: python

        "ecdsa-sha2-nistp256 AAAAE2VjZHNh..."
    """

    def command(self, path: str) -> str:
        return f"cat {shlex.quote(path)}.pub 2>/dev/null || true"

    def process(self, output):
        text = "".join(output).strip()
        return text or None


class RegisteredPublicKeys(FactBase):
    """
    PEM public keys of the SuperNodes registered with the SuperLink, with
    line breaks written as `|`; empty when the database does not exist yet.

    .. code:: python

        ["-----BEGIN PUBLIC KEY-----|MFkwEwYH...|-----END PUBLIC KEY-----|"]
    """

    @staticmethod
    def default():
        return []

    def command(self, database: str) -> str:
        return f"python3 -c {shlex.quote(REGISTERED_KEYS)} {shlex.quote(database)}"

    def process(self, output):
        return [line for line in output if line.strip()]


def openssh_to_pem(line: str) -> str:
    """Return the public key of an OpenSSH line as PEM with `|` for line breaks."""
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_ssh_public_key(" ".join(line.split()[:2]).encode())
    pem = key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return pem.decode().replace("\n", "|")


def is_registered(plan: HostPlan, public_key: str | None) -> bool:
    """Return whether the SuperLink's database already contains this SuperNode's public key."""
    if public_key is None:
        return False
    superlink = plan.federation.superlink
    database = f"{superlink.settings['melody_superlink_state_dir']}/state.db"
    registered = inventory.get_host(superlink.name).get_fact(RegisteredPublicKeys, database=database)
    return openssh_to_pem(public_key) in registered


def register_script(plan: HostPlan, public_key: str) -> str:
    script = register_script_path(plan.federation.superlink.settings)
    return f"printf '%s\\n' {shlex.quote(public_key)} | {script} {shlex.quote(plan.host.name)}"


def register_on_superlink(state, host, plan: HostPlan, key_path: str) -> None:
    """Read the public key on this SuperNode, then register it on the SuperLink host."""
    status, output = host.run_shell_command(f"cat {shlex.quote(key_path)}.pub")
    if not status:
        raise OperationError(f"cannot read {key_path}.pub on {host.name}: {output.stderr}")
    public_key = output.stdout.strip()

    superlink_host = inventory.get_host(plan.federation.superlink.name)
    if not superlink_host.connected:
        superlink_host.connect()
    sudo = bool(superlink_host.data.get("_sudo", False))
    status, output = superlink_host.run_shell_command(register_script(plan, public_key), _sudo=sudo)
    if not status:
        raise OperationError(
            f"on {superlink_host.name}: {output.stderr}; if the SuperLink is not deployed yet, "
            f"run deploy/superlink.py first"
        )
    host.log(output.stdout.strip())


@deploy("SuperNode authentication key")
def register_supernode(plan: HostPlan):
    """Generate the SuperNode's key on its host if missing, and register it with the SuperLink.

    Return the registration operation, or None when the key was registered before.
    """
    user = plan.settings["melody_service_user"]
    key_path = supernode_key_path(plan.settings)
    auth_dir = key_path.rsplit("/", 1)[0]
    public_key = current_host.get_fact(SupernodePublicKey, path=key_path)

    if public_key is None:
        server.shell(
            name=f"authentication key {key_path} is generated on this host",
            commands=[
                f"install -d -o {user} -g {user} -m 0700 {auth_dir}",
                f"{plan.paths.venv}/bin/python -c {shlex.quote(GENERATE_KEY)} {key_path}",
                f"chown {user}:{user} {key_path} {key_path}.pub",
                f"chmod 0644 {key_path}.pub",
            ],
        )
    else:
        current_host.noop(f"authentication key {key_path} exists")

    if is_registered(plan, public_key):
        current_host.noop(f"the public key of {plan.host.name} is registered with the SuperLink already")
        return None
    registered = python.call(
        name="this SuperNode's public key is registered with the SuperLink",
        function=register_on_superlink,
        plan=plan,
        key_path=key_path,
    )
    # A SuperNode rejected before its registration may have hit its start limit.
    server.shell(
        name=f"{SUPERNODE_UNIT} may start again after its registration",
        commands=[f"systemctl reset-failed {SUPERNODE_UNIT} || true"],
    )
    return registered
