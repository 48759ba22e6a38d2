"""SuperNode authentication: a key pair made on each SuperNode, its public key registered.

The private key is generated on the SuperNode host and never leaves it. The
deploy reads only the public key and registers it with the SuperLink, on
the SuperLink host, through the Control API on loopback.
"""

from __future__ import annotations

import shlex
import threading

from pyinfra import host as current_host
from pyinfra import inventory
from pyinfra.api import FactBase, OperationError, deploy
from pyinfra.operations import python, server

from .control_access import register_script_path
from .plan import HostPlan
from .units import SUPERNODE_UNIT, supernode_key_path

# pyinfra prepares and runs every SuperNode in its own greenlet, and all of
# them reach the SuperLink host over one SSH connection, on which sshd opens at
# most MaxSessions channels at once (10 by default). With 16 SuperNodes in
# parallel the extra channels failed ("open failed"). So the registered keys
# are read once per deploy, and at most SUPERLINK_SESSIONS registrations run
# on the SuperLink host at once.
SUPERLINK_SESSIONS = 4
superlink_sessions = threading.BoundedSemaphore(SUPERLINK_SESSIONS)
registered_keys_lock = threading.Lock()
registered_keys_cache: dict[tuple[int, str, str], list[str] | None] = {}

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
# because `flwr supernode list` does not show keys. When the query fails (a
# changed schema), the deploy registers every key and keeps keys it finds in use.
QUERY_FAILED = "QUERY-FAILED"
REGISTERED_KEYS = f"""\
import os, sqlite3, sys
if os.path.exists(sys.argv[1]):
    try:
        connection = sqlite3.connect("file:" + sys.argv[1] + "?mode=ro", uri=True)
        rows = connection.execute(
            "SELECT public_key FROM node WHERE public_key IS NOT NULL AND status != 'unregistered'")
        for (key,) in rows:
            print(bytes(key).decode().replace("\\n", "|"))
    except sqlite3.Error:
        print("{QUERY_FAILED}")
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
    line breaks written as `|`. Empty when the database does not exist yet,
    None when it cannot be read.

    .. code:: python

        ["-----BEGIN PUBLIC KEY-----|MFkwEwYH...|-----END PUBLIC KEY-----|"]
    """

    @staticmethod
    def default():
        return []

    def command(self, database: str) -> str:
        return f"python3 -c {shlex.quote(REGISTERED_KEYS)} {shlex.quote(database)}"

    def process(self, output):
        lines = [line for line in output if line.strip()]
        return None if QUERY_FAILED in lines else lines


def openssh_to_pem(line: str) -> str:
    """Return the public key of an OpenSSH line as PEM with `|` for line breaks."""
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_ssh_public_key(" ".join(line.split()[:2]).encode())
    pem = key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return pem.decode().replace("\n", "|")


def registered_keys(plan: HostPlan) -> list[str] | None:
    """Return the SuperLink's registered keys, or None when its database cannot be read.

    The first SuperNode of a deploy reads them and the others reuse that read.
    """
    superlink = plan.federation.superlink
    database = f"{superlink.settings['melody_superlink_state_dir']}/state.db"
    superlink_host = inventory.get_host(superlink.name)
    key = (id(superlink_host.state), superlink.name, database)
    with registered_keys_lock:
        if key not in registered_keys_cache:
            registered_keys_cache[key] = superlink_host.get_fact(RegisteredPublicKeys, database=database)
        return registered_keys_cache[key]


def register_script(plan: HostPlan, public_key: str) -> str:
    script = register_script_path(plan.federation.superlink.settings)
    return f"printf '%s\\n' {shlex.quote(public_key)} | {script} {shlex.quote(plan.host.name)}"


def generate_key_commands(plan: HostPlan, key_path: str) -> list[str]:
    user = plan.settings["melody_service_user"]
    auth_dir = key_path.rsplit("/", 1)[0]
    return [
        f"install -d -o {user} -g {user} -m 0700 {auth_dir}",
        f"{plan.paths.venv}/bin/python -c {shlex.quote(GENERATE_KEY)} {key_path}",
        f"chown {user}:{user} {key_path} {key_path}.pub",
        f"chmod 0644 {key_path}.pub",
    ]


def register_on_superlink(state, host, plan: HostPlan, key_path: str, known_unregistered: bool) -> None:
    """Read the public key on this SuperNode, then register it on the SuperLink host.

    With `known_unregistered`, the SuperLink's database did not list the key
    as registered. If the SuperLink still has the key, it was unregistered,
    and flwr 1.42 never accepts an unregistered key again. This SuperNode then
    gets a new key, which is registered instead.
    """
    superlink_host = inventory.get_host(plan.federation.superlink.name)
    if not superlink_host.connected:
        superlink_host.connect()

    for attempt in ("current", "new"):
        status, output = host.run_shell_command(f"cat {shlex.quote(key_path)}.pub",
                                                _sudo=bool(host.data.get("_sudo", False)))
        if not status:
            raise OperationError(f"cannot read {key_path}.pub on {host.name}: {output.stderr}")
        public_key = output.stdout.strip()

        with superlink_sessions:
            status, output = superlink_host.run_shell_command(
                register_script(plan, public_key), _sudo=bool(superlink_host.data.get("_sudo", False)))
        if status:
            host.log(output.stdout.strip())
            return
        if "already knows the key" in output.stderr and not known_unregistered:
            host.log("the SuperLink knows this SuperNode's key already")
            return
        if "already knows the key" not in output.stderr or attempt == "new":
            raise OperationError(
                f"on {superlink_host.name}: {output.stderr}; if the SuperLink is not deployed yet, "
                f"run deploy/superlink.py first"
            )

        host.log(f"the SuperLink unregistered the key {key_path} earlier; generating a new key")
        status, output = host.run_shell_command(" && ".join(generate_key_commands(plan, key_path)),
                                                _sudo=bool(host.data.get("_sudo", False)))
        if not status:
            raise OperationError(f"generating a new key on {host.name} failed: {output.stderr}")


@deploy("SuperNode authentication key")
def register_supernode(plan: HostPlan):
    """Generate the SuperNode's key on its host if missing, and register it with the SuperLink.

    Return the registration operation, or None when the key was registered before.
    """
    key_path = supernode_key_path(plan.settings)
    public_key = current_host.get_fact(SupernodePublicKey, path=key_path)

    if public_key is None:
        server.shell(
            name=f"authentication key {key_path} is generated on this host",
            commands=generate_key_commands(plan, key_path),
        )
    else:
        current_host.noop(f"authentication key {key_path} exists")

    registered = registered_keys(plan)
    if public_key is not None and registered is not None and openssh_to_pem(public_key) in registered:
        current_host.noop(f"the public key of {plan.host.name} is registered with the SuperLink already")
        return None
    registration = python.call(
        name="this SuperNode's public key is registered with the SuperLink",
        function=register_on_superlink,
        plan=plan,
        key_path=key_path,
        known_unregistered=registered is not None,
    )
    # A SuperNode rejected before its registration may have hit its start limit.
    server.shell(
        name=f"{SUPERNODE_UNIT} may start again after its registration",
        commands=[f"systemctl reset-failed {SUPERNODE_UNIT} || true"],
    )
    return registration
