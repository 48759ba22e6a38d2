"""Rendered security files: secure unit flags and sandbox, the nginx front, authorized_keys."""

from __future__ import annotations

import re
from types import SimpleNamespace

from melody_deploy.control_access import authorized_keys, local_cli_config
from melody_deploy.fleet_front import FLEET_ROUTES, render_nginx_conf
from melody_deploy.preflight import HostSpec, validate_inventory
from melody_deploy.units import host_paths, render_superlink_unit, render_supernode_unit
from test_units import exec_start_args, service_lines

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGc2pUMKnTrBG9Y2QoCV8Dl1rD0ICHGsvKhz1d6Ah0ek alice@lab"


def federation(**superlink_data):
    return validate_inventory([
        HostSpec("link", ("superlink",), {"ssh_hostname": "10.0.0.5", **superlink_data}),
        HostSpec("site-a", ("supernodes",), {"melody_partition_id": 0, "melody_data_dir": "/srv/a"}),
    ])


def superlink_unit() -> str:
    superlink = federation().superlink
    return render_superlink_unit(superlink, host_paths(superlink.settings, "0123456789ab"))


def supernode_unit() -> str:
    node = federation().supernodes[0]
    return render_supernode_unit(node, host_paths(node.settings, "0123456789ab"), ("10.0.0.5",))


def test_superlink_serves_tls_on_loopback_with_auth():
    args = exec_start_args(superlink_unit())

    assert args[args.index("--host") + 1] == "127.0.0.1"
    assert args[args.index("--port") + 1] == "8001"
    assert args[args.index("--ssl-certfile") + 1] == "/etc/melody/tls/superlink.pem"
    assert args[args.index("--ssl-keyfile") + 1] == "/etc/melody/tls/superlink.key"
    assert args[args.index("--ssl-ca-certfile") + 1] == "/etc/melody/tls/ca.pem"
    assert "--enable-supernode-auth" in args
    assert "--insecure" not in args


def test_supernode_checks_ca_and_signs():
    args = exec_start_args(supernode_unit())

    assert args[args.index("--root-certificates") + 1] == "/etc/melody/tls/ca.pem"
    assert args[args.index("--auth-supernode-private-key") + 1] == "/var/lib/melody-supernode/auth/supernode-key"
    assert "--insecure" not in args


def test_egress_limited_per_role():
    superlink = service_lines(superlink_unit())
    supernode = service_lines(supernode_unit())

    assert superlink["IPAddressAllow"] == ["localhost"]
    assert superlink["IPAddressDeny"] == ["any"]
    assert supernode["IPAddressAllow"] == ["localhost", "10.0.0.5"]
    assert supernode["IPAddressDeny"] == ["any"]


def test_sandbox_options_in_both_units():
    for unit in (superlink_unit(), supernode_unit()):
        lines = service_lines(unit)
        assert lines["SystemCallFilter"] == ["@system-service", "~@privileged @resources", "sched_setaffinity mbind"]
        assert lines["RestrictAddressFamilies"] == ["AF_INET AF_INET6 AF_UNIX"]
        assert lines["CapabilityBoundingSet"] == [""]
        assert lines["PrivateUsers"] == ["yes"]
        assert lines["ProcSubset"] == ["all"]
        assert "MemoryDenyWriteExecute" not in lines
        assert "# MemoryDenyWriteExecute is left out" in unit


def test_supernode_restarts_fast_except_unregistered():
    lines = service_lines(supernode_unit())

    assert lines["RestartSec"] == ["1"]
    assert lines["RestartPreventExitStatus"] == ["78"]
    assert lines["StartLimitBurst"] == ["5"]
    assert lines["StartLimitIntervalSec"] == ["300"]


def test_superlink_restarts_on_any_failure():
    lines = service_lines(superlink_unit())

    assert lines["RestartSec"] == ["5"]
    assert "RestartPreventExitStatus" not in lines


def test_nginx_publishes_fleet_routes_only():
    superlink = federation().superlink
    plan = SimpleNamespace(settings=superlink.settings)

    conf = render_nginx_conf(plan)

    assert "listen 0.0.0.0:8000 ssl;" in conf
    assert "proxy_pass https://$melody_fleet_upstream;" in conf
    assert "server 127.0.0.1:8001 max_conns=4;" in conf
    assert "proxy_ssl_verify on;" in conf
    allowed = re.search(r'location ~ "\^/v1/fleet/\((.*)\)\$"', conf).group(1).split("|")
    assert allowed == list(FLEET_ROUTES)
    assert "control" not in conf.replace("Control and", "")
    assert "limit_except POST" in conf


def test_nginx_reuses_connections_and_retries_errors():
    superlink = federation().superlink
    conf = render_nginx_conf(SimpleNamespace(settings=superlink.settings))

    assert re.search(r"keepalive \d+;", conf)
    assert 'proxy_set_header Connection "";' in conf
    assert "error_page 500 = @superlink_error;" in conf
    assert "/v1/fleet/send-node-heartbeat melody_superlink_heartbeat;" in conf
    assert "return 503" in conf


def test_authorized_keys_forward_only_from_networks():
    settings = federation(melody_researcher_networks=["10.20.0.0/24", "10.30.0.7/32"],
                          melody_researcher_ssh_keys=[KEY]).superlink.settings

    lines = [line for line in authorized_keys(settings).splitlines() if not line.startswith("#")]

    assert lines == [
        'restrict,port-forwarding,permitopen="127.0.0.1:8001",from="10.20.0.0/24,10.30.0.7/32",'
        f'command="/bin/false" {KEY}'
    ]


def test_authorized_keys_empty_without_networks():
    settings = federation(melody_researcher_ssh_keys=[KEY]).superlink.settings

    lines = [line for line in authorized_keys(settings).splitlines() if not line.startswith("#")]

    assert lines == []


def test_local_cli_config_uses_loopback_and_ca():
    config = local_cli_config(federation().superlink.settings)

    assert 'address = "127.0.0.1:8001"' in config
    assert 'root-certificates = "/etc/melody/tls/ca.pem"' in config
