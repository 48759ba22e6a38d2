"""The Docker Compose example, run for real: images built offline, a SuperLink, two SuperNodes, melody_app.

The module starts a Docker daemon of its own (melody_deploy/dockerd.py) with
forwarding and firewall management off. It brings the example up with TLS
and SuperNode authentication and trains 2 rounds on shards of DermaMNIST.
Then it removes the services, the daemon and everything they added, and
checks that the machine's routes, firewall rules and forwarding are as they were.
"""

import json
import math
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from melody_deploy import compose
from melody_deploy.compose_stack import CONNECTION, Stack, StackError
from melody_deploy.dockerd import DOCKERD, Dockerd, bridge_names, mounts_under, processes_naming

REPO_ROOT = Path(__file__).resolve().parents[1]
DERMAMNIST = Path("/work/shared/data/dermamnist28")
DAEMON_ROOT = REPO_ROOT / ".cache" / "docker"
PROJECT = "melodytest"
# Small shards keep the 2 rounds short: train and test images per site.
TRAIN_PER_SITE = 400
TEST_PER_SITE = 80
ROUNDS = 2
RESULT_PREFIX = "MELODY_RESULT "
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")
LAB_DEVICE = re.compile(r"dev (melodylab-|vb-)")


def test_committed_compose_file_is_rendered_from_settings():
    assert compose.COMPOSE_FILE.read_text() == compose.render_compose(), (
        "docker/compose_example/compose.yml differs from the settings; run "
        "`.venv/bin/python -m melody_deploy.compose render` and commit the file")


def test_compose_file_takes_ports_and_version_from_settings():
    text = compose.COMPOSE_FILE.read_text()
    settings = compose.federation().superlink.settings
    assert f'"--port"\n      - "{settings["melody_superlink_port"]}"' in text
    assert f"flwr {settings['melody_flwr_version']}" in text
    assert "--insecure" not in text.replace("Nothing here runs with --insecure", "")
    assert "internal: true" in text


def test_env_needs_one_site_per_supernode(tmp_path):
    with pytest.raises(ValueError, match="one --site folder per SuperNode"):
        compose.render_env(project="p", image="i", tls_dir=tmp_path, keys_dir=tmp_path,
                           researcher_home=tmp_path, sites=[tmp_path])


def test_up_rejects_missing_site_before_any_change(tmp_path):
    run_dir = tmp_path / "run"
    with pytest.raises(StackError, match=re.escape(f"--site {tmp_path / 'b'}: labels.csv not found")):
        (tmp_path / "a").mkdir()
        (tmp_path / "a" / "labels.csv").write_text("image,label,split\n")
        Stack(run_dir=run_dir).up(sites=[tmp_path / "a", tmp_path / "b"], rootfs=tmp_path / "rootfs-bookworm-0.tar.gz")
    assert not run_dir.exists()


def test_up_rejects_missing_rootfs_archive(tmp_path):
    (tmp_path / "labels.csv").write_text("image,label,split\n")
    with pytest.raises(StackError, match="--rootfs .*: file not found"):
        Stack(run_dir=tmp_path / "run").up(sites=[tmp_path, tmp_path], rootfs=tmp_path / "missing.tar.gz")


def host_network_state() -> dict:
    """What the daemon must leave unchanged: routes, firewall rules and forwarding."""
    def output(command: list[str]) -> str:
        if shutil.which(command[0]) is None:
            return f"{command[0]} not installed"
        return subprocess.run(command, capture_output=True, text=True, check=False).stdout

    def own_routes(text: str) -> str:
        # Other checkouts' labs may start or stop meanwhile; their bridges and
        # veths are theirs, so their routes are left out of the comparison.
        return "\n".join(line for line in text.splitlines() if not LAB_DEVICE.search(line))

    rules = output(["iptables-save"])
    # Counters change with traffic; the rules themselves must not.
    rules = "\n".join(line for line in rules.splitlines() if not line.startswith(("#", ":")))
    return {
        "routes": own_routes(output(["ip", "-4", "route", "show", "table", "all"])),
        "ip6routes": own_routes(output(["ip", "-6", "route", "show", "table", "all"])),
        "rules": rules,
        "ip6rules": "\n".join(line for line in output(["ip6tables-save"]).splitlines()
                              if not line.startswith(("#", ":"))),
        "forwarding": Path("/proc/sys/net/ipv4/ip_forward").read_text().strip(),
        "bridges": sorted(name for name in bridge_names() if not name.startswith("melodylab-")),
    }


def write_sites(root: Path) -> list[Path]:
    """Copy a small slice of DermaMNIST and split it into one shard per SuperNode, as the lab does."""
    from melody_lab import data  # pylint: disable=import-outside-toplevel

    rows = data.read_labels(DERMAMNIST)
    count = len(compose.SUPERNODE_SERVICES)
    subset = ([row for row in rows if row["split"] == "train"][: TRAIN_PER_SITE * count]
              + [row for row in rows if row["split"] == "test"][: TEST_PER_SITE * count])
    sites = []
    for partition_id in range(count):
        site = root / f"site-{partition_id + 1}"
        data.write_shard(DERMAMNIST, data.shard_rows(subset, partition_id, count), site, data.labels_columns(DERMAMNIST))
        sites.append(site)
    return sites


# pytest runs a failed module fixture again for every test; one try is enough.
FIXTURE_ERRORS: list[str] = []


@pytest.fixture(scope="module")
def stack(request, tmp_path_factory):
    """The example brought up on a daemon of this test's own; all of it removed at the end."""
    if FIXTURE_ERRORS:
        pytest.fail(f"bringing the example up failed already: {FIXTURE_ERRORS[0]}")
    if os.geteuid() != 0:
        pytest.skip("the Docker daemon needs root")
    if not Path(DOCKERD).is_file():
        pytest.fail(f"{DOCKERD} is missing; scripts/setup.sh installs it (scripts/install-docker.sh)")
    if not (DERMAMNIST / "labels.csv").is_file():
        pytest.skip(f"needs {DERMAMNIST}")
    from melody_lab import rootfs, settings as lab_settings  # pylint: disable=import-outside-toplevel

    archive = rootfs.ensure_archive(lab_settings.cache_dir())
    before = host_network_state()
    daemon = Dockerd(DAEMON_ROOT)
    running = Stack(run_dir=tmp_path_factory.mktemp("compose"), project=PROJECT, daemon=daemon)

    def remove_everything():
        # Runs also when a test or the start failed; each step tolerates what is already gone.
        if daemon.pid() is not None:
            try:
                running.down(volumes=True)
            except Exception as error:  # pylint: disable=broad-except
                print(f"compose down failed, the daemon's own cleanup follows: {error}")
        daemon.stop()

    request.addfinalizer(remove_everything)
    started = time.monotonic()
    try:
        daemon.start()
        running.up(sites=write_sites(tmp_path_factory.mktemp("sites")), rootfs=archive)
    except Exception as error:
        FIXTURE_ERRORS.append(f"{type(error).__name__}: {error}")
        raise
    print(f"compose up (images, TLS, keys, services, both SuperNodes online) took {time.monotonic() - started:.1f} s")
    running.before = before
    return running


def inspect(stack: Stack, service: str) -> dict:
    container = f"{PROJECT}_{service}_1"
    result = stack.daemon.docker("inspect", container)
    return json.loads(result.stdout)[0]


def service_exec(stack: Stack, service: str, command: str) -> subprocess.CompletedProcess:
    return stack.run_compose("exec", "-T", service, "sh", "-c", command, check=False)


@pytest.mark.lab
def test_services_run_unprivileged_on_an_internal_network(stack):
    for service in (compose.SUPERLINK_SERVICE, *compose.SUPERNODE_SERVICES):
        details = inspect(stack, service)
        assert details["State"]["Running"], f"{service}: {details['State']}"
        assert details["Config"]["User"] == "10001:10001"
        assert details["HostConfig"]["ReadonlyRootfs"] is True
        assert details["HostConfig"]["CapDrop"] == ["ALL"]
        assert details["Config"]["Env"].count("FLWR_TELEMETRY_ENABLED=0") == 1
        assert "FLWR_DISABLE_UPDATE_CHECK=1" in details["Config"]["Env"]
        assert service_exec(stack, service, "cat /proc/sys/net/ipv6/conf/all/disable_ipv6").stdout.strip() == "1"
    network = json.loads(stack.daemon.docker("network", "inspect", f"{PROJECT}_federation").stdout)[0]
    assert network["Internal"] is True

    # The host has no address on the network's bridge, so the containers
    # reach each other only: IPv4 routes, rules and forwarding are as before.
    # (The kernel gives the host's ends of the veths IPv6 link-local routes;
    # they go with the veths, which the last test checks.)
    during = host_network_state()
    bridge = f"br-{network['Id'][:12]}"
    assert during["bridges"] == sorted({*stack.before["bridges"], bridge})
    assert subprocess.run(["ip", "-4", "-brief", "address", "show", "dev", bridge], capture_output=True,
                          text=True, check=True).stdout.split()[2:] == []
    assert {key: value for key, value in during.items() if key not in ("bridges", "ip6routes")} == \
        {key: value for key, value in stack.before.items() if key not in ("bridges", "ip6routes")}

    # The site's images are read-only and the Flower home is writable.
    denied = service_exec(stack, "supernode-1", "touch /srv/melody/data/x")
    assert denied.returncode != 0
    assert service_exec(stack, "supernode-1", "touch $FLWR_HOME/probe && rm $FLWR_HOME/probe").returncode == 0
    # The superlink's runtime dependency installation is off.
    assert "--disable-runtime-dependency-installation" in inspect(stack, "superlink")["Config"]["Cmd"]


@pytest.mark.lab
def test_melody_app_completes_two_rounds(stack):
    started = time.monotonic()
    run = stack.flwr("run", compose.CONTAINER_APP_DIR, CONNECTION, "--stream", "--run-config",
                     f"num-server-rounds={ROUNDS} head-rounds=0 local-epochs=1 cpu-threads=1 "
                     "test-time-augmentation=false",
                     timeout=400)
    print(f"flwr run of {ROUNDS} rounds took {time.monotonic() - started:.1f} s")
    output = ANSI_ESCAPE.sub("", run.stdout + run.stderr)
    assert run.returncode == 0, output[-3000:]

    match = re.search(r"Successfully started run (\d+)", output)
    assert match, output[-2000:]
    listing = stack.flwr("ls", CONNECTION, "--run-id", match.group(1), "--format", "json")
    assert json.loads(listing.stdout)["runs"][0]["status"] == "finished:completed"

    lines = [line for line in output.splitlines() if RESULT_PREFIX in line]
    assert len(lines) == 1, output[-2000:]
    rounds = json.loads(lines[0].split(RESULT_PREFIX, 1)[1])["rounds"]
    assert [entry["round"] for entry in rounds] == list(range(1, ROUNDS + 1))
    for entry in rounds:
        for key in ("train_loss", "eval_loss", "accuracy", "balanced_accuracy"):
            assert math.isfinite(entry[key]), f"round {entry['round']} {key}={entry[key]!r}"
        assert 0.0 <= entry["accuracy"] <= 1.0
        assert entry["num_examples"] == 2 * TEST_PER_SITE
        assert entry["num_train_examples"] == 2 * TRAIN_PER_SITE
        assert len(entry["sites"]) == 2
    stack.run_id = int(match.group(1))


@pytest.mark.lab
def test_supernodes_write_the_egress_record_to_their_volume(stack):
    run_id = getattr(stack, "run_id", None)
    if run_id is None:
        pytest.skip("needs the run of test_melody_app_completes_two_rounds")
    for service in compose.SUPERNODE_SERVICES:
        text = service_exec(stack, service, "cat $MELODY_AUDIT_DIR/egress.jsonl").stdout
        records = [json.loads(line) for line in text.splitlines()]
        mine = [record for record in records if record["run_id"] == run_id]
        # Per round, one training reply and one evaluation reply.
        assert len(mine) >= 2 * ROUNDS, f"{service}: {len(mine)} records of run {run_id}"
        assert all(record["status"] == "sent" for record in mine)
        # Without journald in the container the launcher keeps running and logs no error about it.
        logs = stack.run_compose("logs", "--no-color", service).stdout
        assert "Traceback" not in logs, logs[-3000:]


@pytest.mark.lab
def test_down_leaves_no_container_network_daemon_or_rule(stack):
    stack.down(volumes=True)
    assert stack.daemon.docker("ps", "--all", "--quiet").stdout.strip() == b""
    networks = stack.daemon.docker("network", "ls", "--format", "{{.Name}}").stdout.decode().split()
    assert sorted(networks) == ["host", "none"]
    assert stack.daemon.docker("volume", "ls", "--quiet").stdout.strip() == b""

    stack.daemon.stop()
    assert stack.daemon.pid() is None
    assert processes_naming(str(DAEMON_ROOT)) == []
    assert mounts_under(DAEMON_ROOT) == []
    assert host_network_state() == stack.before
