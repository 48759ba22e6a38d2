"""The secure default on the lab, tried as an operator, a researcher and a misbehaving SuperNode would.

The SuperLink host serves TLS through nginx with the Fleet API only; the
Control API is reachable through the researcher's SSH tunnel alone. Each
test names the attempt it makes and checks its real outcome on the hosts.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import subprocess
import textwrap
import time
from pathlib import Path

import pytest
from cryptography import x509

from melody_deploy import tls
from melody_lab.control_tunnel import control_tunnel, researcher_key
from lab_scripts import unregistered_supernode
from test_lab_deploy import (
    REPO, SUPERLINK_UNIT, SUPERNODE_UNIT, assert_deployed, main_pids, on_host, output_of, pyinfra,
    run_flwr, write_inventory,
)

pytestmark = pytest.mark.lab

MAX_EXPOSURE = 2.0
FRONT_PORT = 8000
INTERNAL_PORT = 8001


@pytest.fixture(scope="module")
def secured(lab):
    """Deploy both roles with the lab inventory's secure defaults; return the lab and the outputs."""
    superlink = pyinfra("inventories/lab.py", "deploy/superlink.py")
    assert_deployed(superlink, "deploy/superlink.py")
    supernode = pyinfra("inventories/lab.py", "deploy/supernode.py")
    assert_deployed(supernode, "deploy/supernode.py")
    return lab, superlink.stdout + superlink.stderr + supernode.stdout + supernode.stderr


def python_on(lab, name: str, code: str) -> subprocess.CompletedProcess:
    """Run a Python snippet with the host's python3."""
    return on_host(lab, name, f"python3 - <<'EOF'\n{textwrap.dedent(code)}\nEOF")


def https_request(lab, name: str, method: str, path: str, port: int = FRONT_PORT) -> str:
    """Send one HTTPS request from a host to the SuperLink host, trusting the CA; return 'STATUS body'."""
    result = python_on(lab, name, f"""
        import http.client, ssl
        context = ssl.create_default_context(cafile="/etc/melody/tls/ca.pem")
        connection = http.client.HTTPSConnection("superlink", {port}, context=context, timeout=10)
        connection.request({method!r}, {path!r}, body=b"" if {method!r} == "POST" else None)
        response = connection.getresponse()
        print(response.status, response.read(200))
    """)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_units_exposure_at_most_2(secured):
    lab, _ = secured
    scores = {}
    for name, unit in [("superlink", SUPERLINK_UNIT), (lab.supernodes[0].name, SUPERNODE_UNIT)]:
        report = output_of(lab, name, f"systemd-analyze security {unit} | tail -1")
        scores[unit] = float(re.search(r"exposure level for \S+: ([0-9.]+)", report).group(1))

    print(f"systemd-analyze security: {scores}")
    for unit, score in scores.items():
        assert score <= MAX_EXPOSURE, f"{unit} scores {score}"


def test_private_keys_readable_by_service_only(secured):
    lab, output = secured
    supernode = lab.supernodes[0].name

    superlink_key = output_of(lab, "superlink", "stat -c '%U %G %a' /etc/melody/tls/superlink.key")
    tls_dir = output_of(lab, "superlink", "stat -c '%U %G %a' /etc/melody/tls")
    node_key = output_of(lab, supernode, "stat -c '%U %G %a' /var/lib/melody-supernode/auth/supernode-key")
    local_keys = [path for path in (REPO / ".lab" / "tls").glob("*.key")]

    assert superlink_key == "root melody 640"
    assert tls_dir == "root melody 750"
    assert node_key == "melody melody 600"
    assert local_keys
    for path in local_keys:
        assert path.stat().st_mode & 0o077 == 0, f"{path} is readable by others"
    assert "PRIVATE KEY" not in output


def test_unregistered_supernode_rejected(secured):
    lab, _ = secured
    name = lab.supernodes[-1].name
    # A SuperNode with the right CA and a fresh key that was never registered.
    attempt = on_host(lab, name, unregistered_supernode("flower-supernode"))

    assert attempt.returncode not in (0, 124), attempt.stdout[-3000:]
    assert "Failed to activate SuperNode" in attempt.stdout
    assert "Exit Code: 305" in attempt.stdout
    # The registered SuperNode on the same host is still connected.
    assert output_of(lab, name, f"systemctl is-active {SUPERNODE_UNIT}") == "active"


def test_plain_http_to_tls_port_rejected(secured):
    lab, _ = secured
    result = python_on(lab, lab.supernodes[0].name, f"""
        import http.client
        connection = http.client.HTTPConnection("superlink", {FRONT_PORT}, timeout=10)
        connection.request("POST", "/v1/fleet/get-run", body=b"")
        response = connection.getresponse()
        print(response.status, response.read(300))
    """)

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("400 "), result.stdout
    assert "plain HTTP request was sent to HTTPS port" in result.stdout


CLOSED_PATHS = [
    ("POST", "/v1/control/list-runs"),
    ("POST", "/v1/control/start-run"),
    ("POST", "/v1/runtime/get-run"),
    ("GET", "/docs"),
    ("GET", "/health"),
    ("POST", "/v1/fleet/../control/list-runs"),
    ("POST", "/v1/fleet/%2e%2e/control/list-runs"),
    ("POST", "/v1/fleet//get-run"),
    ("POST", "/v1/fleet/get-run?next=/v1/control/list-runs"),
]


def test_control_api_closed_from_supernode(secured):
    lab, _ = secured
    name = lab.supernodes[0].name

    for method, path in CLOSED_PATHS:
        response = https_request(lab, name, method, path)
        assert response.startswith("404 "), f"{method} {path}: {response}"
    assert https_request(lab, name, "GET", "/v1/fleet/get-run").startswith("403 ")
    # A Fleet route passes the front and reaches the SuperLink, which rejects the empty request itself.
    assert not https_request(lab, name, "POST", "/v1/fleet/get-run").startswith("404 ")

    internal = python_on(lab, name, f"""
        import socket
        try:
            socket.create_connection(("superlink", {INTERNAL_PORT}), timeout=5).close()
            print("connected")
        except OSError as error:
            print("failed", error)
    """)
    assert internal.stdout.startswith("failed"), internal.stdout


def test_flwr_cli_from_supernode_fails(secured):
    lab, _ = secured
    name = lab.supernodes[0].name
    # The SuperNode's own flwr CLI, pointed at the SuperLink with the right CA.
    attempt = on_host(lab, name, textwrap.dedent("""\
        folder=$(mktemp -d)
        printf '[superlink.tre]\\naddress = "superlink:8000"\\nroot-certificates = "/etc/melody/tls/ca.pem"\\n' \\
            > "$folder/config.toml"
        venv=$(grep -o '/opt/melody/venvs/[^/ ]*' /etc/systemd/system/melody-supernode.service | head -1)
        cd "$folder" && FLWR_HOME="$folder" FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 \\
            timeout 60 "$venv/bin/flwr" ls tre --format json 2>&1
        code=$?
        rm -rf "$folder"
        exit $code
    """))

    # flwr 1.42 exits 0 with --format json and reports the failure in the JSON.
    response = json.loads(attempt.stdout[attempt.stdout.index("{"):])
    assert response["success"] is False, attempt.stdout
    assert "404 Not Found" in response["error-message"]
    assert "runs" not in response


def test_researcher_key_rejected_from_supernode(secured):
    lab, _ = secured
    name = lab.supernodes[0].name
    key = researcher_key().read_text()
    # Even with the researcher's own key, a tunnel from a SuperNode's address is refused.
    attempt = on_host(lab, name, textwrap.dedent(f"""\
        folder=$(mktemp -d)
        cat > "$folder/key" <<'KEY'
        {key.strip()}
        KEY
        chmod 600 "$folder/key"
        timeout 30 ssh -N -i "$folder/key" -o IdentitiesOnly=yes -o BatchMode=yes \\
            -o StrictHostKeyChecking=accept-new -o UserKnownHostsFile="$folder/known_hosts" \\
            -L 127.0.0.1:18123:127.0.0.1:{INTERNAL_PORT} melody-control@superlink 2>&1
        code=$?
        rm -rf "$folder"
        exit $code
    """).replace("\n        ", "\n"))

    assert attempt.returncode not in (0, 124), attempt.stdout
    assert "Permission denied" in attempt.stdout


def test_control_api_open_through_tunnel(secured, tmp_path):
    lab, _ = secured
    flwr_home = tmp_path / "flwr-home"

    with control_tunnel() as port:
        researcher_connection(flwr_home, port)
        listing = run_flwr(["ls", "lab", "--format", "json"], flwr_home, timeout=60)
        nodes = run_flwr(["supernode", "ls", "lab", "--format", "json"], flwr_home, timeout=60)

    assert listing.returncode == 0, listing.stdout + listing.stderr
    assert "runs" in json.loads(listing.stdout)
    assert nodes.returncode == 0, nodes.stdout + nodes.stderr
    assert nodes.stdout.count('"online"') >= len(lab.supernodes), nodes.stdout


def researcher_connection(flwr_home: Path, port: int) -> None:
    configured = subprocess.run(
        [str(REPO / ".venv" / "bin" / "python"), "-m", "melody_deploy.researcher", "inventories/lab.py",
         "--connection", "lab", "--tunnel-port", str(port)],
        cwd=REPO, env={**os.environ, "FLWR_HOME": str(flwr_home)}, capture_output=True, text=True,
    )
    assert configured.returncode == 0, configured.stderr


def latest_node_id(lab, name: str) -> str:
    log = output_of(lab, name, f"journalctl --unit {SUPERNODE_UNIT} --no-pager --output cat")
    return re.findall(r"SuperNode ID: (\d+)", log)[-1]


def test_unregistered_node_gets_new_key(secured, tmp_path):
    lab, _ = secured
    name = lab.supernodes[-1].name
    key_file = "/var/lib/melody-supernode/auth/supernode-key.pub"
    old_key = output_of(lab, name, f"cat {key_file}")
    old_pid = output_of(lab, name, f"systemctl show --property MainPID --value {SUPERNODE_UNIT}")
    flwr_home = tmp_path / "flwr-home"

    # A researcher unregisters this SuperNode; flwr 1.42 never accepts that key again.
    with control_tunnel() as port:
        researcher_connection(flwr_home, port)
        removed = run_flwr(["supernode", "unregister", latest_node_id(lab, name), "lab"], flwr_home, timeout=60)
    assert removed.returncode == 0, removed.stdout + removed.stderr
    for _ in range(90):
        if output_of(lab, name, f"systemctl show --property MainPID --value {SUPERNODE_UNIT}") != old_pid:
            break
        time.sleep(1)
    else:
        pytest.fail(f"{name} kept running after its key was unregistered")

    redeployed = pyinfra("inventories/lab.py", "deploy/supernode.py")

    assert_deployed(redeployed, "deploy/supernode.py after an unregistration")
    assert "generating a new key" in redeployed.stdout + redeployed.stderr
    assert output_of(lab, name, f"cat {key_file}") != old_key
    assert output_of(lab, name, f"systemctl is-active {SUPERNODE_UNIT}") == "active"


def probe_from_supernode_service(lab, name: str, address: str, port: int) -> str:
    """Connect from a process placed in the SuperNode unit's cgroup, where its IP firewall applies."""
    cgroup = "system.slice/melody-supernode.service"
    result = on_host(lab, name, textwrap.dedent(f"""\
        sh -c 'echo $$ > /sys/fs/cgroup/unified/{cgroup}/cgroup.procs
               echo $$ > /sys/fs/cgroup/systemd/{cgroup}/cgroup.procs
               exec python3 -c "
        import socket
        try:
            socket.create_connection((\\"{address}\\", {port}), timeout=4).close()
            print(\\"connected\\")
        except OSError as error:
            print(\\"failed\\", error)
        "'
    """))
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_supernode_egress_only_to_superlink(secured):
    lab, _ = secured
    source, other = lab.supernodes[0], lab.supernodes[1]

    to_superlink = probe_from_supernode_service(lab, source.name, "superlink", FRONT_PORT)
    to_other_host = probe_from_supernode_service(lab, source.name, other.address, 22)
    outside_unit = python_on(lab, source.name, f"""
        import socket
        socket.create_connection(("{other.address}", 22), timeout=4).close()
        print("connected")
    """).stdout.strip()

    assert to_superlink == "connected"
    assert to_other_host.startswith("failed"), to_other_host
    # The same connection from outside the unit works, so the unit's firewall blocked it.
    assert outside_unit == "connected"


def served_certificate(lab, name: str) -> x509.Certificate:
    result = python_on(lab, name, f"""
        import socket, ssl
        context = ssl.create_default_context(cafile="/etc/melody/tls/ca.pem")
        with socket.create_connection(("superlink", {FRONT_PORT}), timeout=10) as raw:
            with context.wrap_socket(raw, server_hostname="superlink") as wrapped:
                print(ssl.DER_cert_to_PEM_cert(wrapped.getpeercert(binary_form=True)))
    """)
    assert result.returncode == 0, result.stderr
    return x509.load_pem_x509_certificate(result.stdout.encode())


def replace_generated_certificate(folder: Path, valid_days: int, issued_days_ago: int) -> None:
    """Put a certificate for the same names, issued by the lab's CA, into the lab's TLS folder."""
    from cryptography.hazmat.primitives import serialization

    ca = x509.load_pem_x509_certificate((folder / tls.CA_CERT).read_bytes())
    ca_key = serialization.load_pem_private_key((folder / tls.CA_KEY).read_bytes(), password=None)
    current = x509.load_pem_x509_certificate((folder / tls.SERVER_CERT).read_bytes())
    names = [current.subject.rfc4514_string().removeprefix("CN=")]
    names += [name for name in sorted(tls.certificate_names(current)) if name != names[0]]
    issued = tls.utc_now() - datetime.timedelta(days=issued_days_ago)
    key, certificate = tls.create_server_certificate(ca_key, ca, names, valid_days, issued)
    tls.write_private(folder / tls.SERVER_KEY, tls.pem_key(key))
    tls.write_public(folder / tls.SERVER_CERT, tls.pem_certificate(certificate))


def test_certificate_near_expiry_renewed(secured):
    lab, _ = secured
    folder = REPO / ".lab" / "tls"
    # A certificate that expires in 10 days, inside the 30-day renewal window.
    replace_generated_certificate(folder, valid_days=20, issued_days_ago=10)
    before = main_pids(lab)["superlink"]

    renewed = pyinfra("inventories/lab.py", "deploy/superlink.py")

    assert_deployed(renewed, "deploy/superlink.py with a certificate about to expire")
    combined = renewed.stdout + renewed.stderr
    assert "issued a new SuperLink certificate" in combined
    assert "within 30 days" in combined
    served = served_certificate(lab, lab.supernodes[0].name)
    assert served.not_valid_after_utc > tls.utc_now() + datetime.timedelta(days=300)
    assert main_pids(lab)["superlink"] != before, "the SuperLink still serves the old certificate"
    supernodes = pyinfra("inventories/lab.py", "deploy/supernode.py")
    assert_deployed(supernodes, "deploy/supernode.py after the renewal")


def test_expired_certificate_refused_by_supernode(secured, tmp_path):
    lab, _ = secured
    name = lab.supernodes[0].name
    expired = tmp_path / "expired"
    expired.mkdir()
    for file in (tls.CA_CERT, tls.CA_KEY, tls.SERVER_CERT):
        (expired / file).write_bytes((REPO / ".lab" / "tls" / file).read_bytes())
    replace_generated_certificate(expired, valid_days=30, issued_days_ago=40)
    certificate = (expired / tls.SERVER_CERT).read_text()
    key = (expired / tls.SERVER_KEY).read_text()
    # A TLS server on the SuperLink host that presents the expired certificate,
    # as a SuperLink would after its certificate expired unrenewed.
    server = python_on(lab, "superlink", f"""
        import subprocess, textwrap
        folder = subprocess.run(["mktemp", "-d"], capture_output=True, text=True).stdout.strip()
        open(folder + "/cert.pem", "w").write({certificate!r})
        open(folder + "/key.pem", "w").write({key!r})
        code = textwrap.dedent('''
            import socket, ssl, sys
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(sys.argv[1] + "/cert.pem", sys.argv[1] + "/key.pem")
            listener = socket.create_server(("0.0.0.0", 8443))
            listener.settimeout(60)
            try:
                connection, _ = listener.accept()
                context.wrap_socket(connection, server_side=True)
            except (OSError, ssl.SSLError):
                pass
        ''')
        process = subprocess.Popen(["python3", "-c", code, folder], start_new_session=True,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        print(process.pid, folder)
    """)
    assert server.returncode == 0, server.stderr
    pid, folder = server.stdout.split()
    try:
        attempt = python_on(lab, name, """
            import socket, ssl, time
            context = ssl.create_default_context(cafile="/etc/melody/tls/ca.pem")
            for _ in range(20):
                try:
                    raw = socket.create_connection(("superlink", 8443), timeout=5)
                    break
                except ConnectionRefusedError:
                    time.sleep(0.25)
            try:
                context.wrap_socket(raw, server_hostname="superlink")
                print("accepted")
            except ssl.SSLCertVerificationError as error:
                print("refused", error.verify_message)
        """)
    finally:
        on_host(lab, "superlink", f"kill {pid} 2>/dev/null; rm -rf {folder}")

    assert attempt.stdout.strip() == "refused certificate has expired", attempt.stdout + attempt.stderr


def test_supplied_certificate_for_other_names_stops_before_changes(secured, tmp_path):
    lab, _ = secured
    operator = tmp_path / "operator"
    operator.mkdir()
    ca_key, ca = tls.create_ca(tls.utc_now())
    key, certificate = tls.create_server_certificate(ca_key, ca, ["elsewhere.example"], 90, tls.utc_now())
    (operator / "ca.pem").write_bytes(tls.pem_certificate(ca))
    (operator / "server.pem").write_bytes(tls.pem_certificate(certificate))
    (operator / "server.key").write_bytes(tls.pem_key(key))
    inventory = write_inventory(tmp_path / "wrong_names.py", f"""\
        tls_files = {{
            "melody_tls_ca_cert": {str(operator / "ca.pem")!r},
            "melody_tls_server_cert": {str(operator / "server.pem")!r},
            "melody_tls_server_key": {str(operator / "server.key")!r},
        }}
        superlink = [(name, {{**data, **tls_files}}) for name, data in superlink]
    """)
    digest = output_of(lab, "superlink", "sha256sum /etc/melody/tls/superlink.pem")
    pids = main_pids(lab)

    result = pyinfra(inventory, "deploy/superlink.py")

    combined = result.stdout + result.stderr
    assert result.returncode != 0
    assert "setting 'melody_tls_server_cert'" in combined
    assert "does not name superlink" in combined
    assert "no host was changed" in combined
    assert output_of(lab, "superlink", "sha256sum /etc/melody/tls/superlink.pem") == digest
    assert main_pids(lab) == pids


def test_insecure_deploy_warns_loudly(secured, tmp_path):
    inventory = write_inventory(tmp_path / "insecure.py", """\
        superlink = [(name, {**data, "melody_insecure": True}) for name, data in superlink]
        supernodes = [(name, {**data, "melody_insecure": True}) for name, data in supernodes]
    """)

    # --dry reads the facts and plans the operations without changing a host.
    result = subprocess.run([str(REPO / ".venv" / "bin" / "pyinfra"), "-y", "--dry", str(inventory),
                             "deploy/superlink.py"], cwd=REPO, capture_output=True, text=True, timeout=600)

    combined = result.stdout + result.stderr
    assert result.returncode == 0, combined[-3000:]
    assert "WARNING host superlink: melody_insecure is True" in combined
    assert "WITHOUT TLS" in combined
