"""The verify command's checks and table, without hosts: shell syntax, parsing, exit codes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from melody_deploy.preflight import HostSpec, validate_inventory
from melody_deploy.verify import CheckResult, format_table, parse_output, summary
from melody_deploy.verify_checks import EXTRA_CHECKS, ShellCheck, host_checks, host_script, report

REPO = Path(__file__).resolve().parent.parent


def federation(**superlink_data):
    specs = [
        HostSpec("link", ("superlink",), {"melody_insecure": True, **superlink_data}),
        HostSpec("site-a", ("supernodes",), {"melody_insecure": True, "melody_partition_id": 0,
                                             "melody_data_dir": "/srv/a"}),
    ]
    return validate_inventory(specs)


def test_host_scripts_are_valid_shell():
    validated = federation()

    for host in (validated.superlink, *validated.supernodes):
        script = host_script(host_checks(host, len(validated.supernodes)))
        checked = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True)
        assert checked.returncode == 0, f"{host.name}: {checked.stderr}\n{script}"


def test_checks_per_role():
    validated = federation()

    superlink_checks = [check.name for check in host_checks(validated.superlink, 1)]
    supernode_checks = [check.name for check in host_checks(validated.supernodes[0], 1)]

    assert superlink_checks == ["service active", "service enabled", "listening", "supernodes online",
                                "flwr version", "disk space", "certificate"]
    assert supernode_checks == ["service active", "service enabled", "connected", "data dir",
                                "flwr version", "disk space", "certificate"]


def test_report_line_parsed_back():
    script = report("disk space", "fail", "only $((2 + 3)) MiB left")

    output = subprocess.run(["bash", "-c", script], capture_output=True, text=True).stdout
    rows = parse_output("site-a", output.splitlines(), ["disk space"])

    assert rows == [CheckResult("site-a", "disk space", "fail", "only 5 MiB left")]


def test_missing_result_counts_as_failure():
    rows = parse_output("link", ["listening\tpass\tlistening on 0.0.0.0:8000"], ["listening", "flwr version"])

    assert rows[1] == CheckResult("link", "flwr version", "fail", "the check printed no result")


def test_extra_checks_hook_adds_rows():
    validated = federation()
    EXTRA_CHECKS.append(lambda host: [ShellCheck("certificate expiry", report("certificate expiry", "pass", "ok"))])
    try:
        names = [check.name for check in host_checks(validated.superlink, 1)]
    finally:
        EXTRA_CHECKS.pop()

    assert names[-1] == "certificate expiry"


def test_table_and_summary_name_failed_hosts():
    rows = [
        CheckResult("link", "service active", "pass", "melody-superlink.service is active"),
        CheckResult("site-a", "connected", "fail", "no SuperNode ID: line since the last start"),
    ]

    table = format_table(rows)

    assert table.splitlines()[2].split()[:4] == ["site-a", "connected", "FAIL", "no"]
    assert summary(rows) == "verify: 1 of 2 checks failed, on site-a"


def test_invalid_inventory_exits_2(tmp_path):
    inventory = tmp_path / "bad.py"
    inventory.write_text(
        'superlink = [("link", {"melody_insecure": True})]\n'
        'supernodes = [("site-a", {"melody_insecure": True, "melody_partition_id": "zero",'
        ' "melody_data_dir": "/srv/a"})]\n'
    )

    # A subprocess, because pyinfra's command line patches the process for gevent.
    result = subprocess.run([sys.executable, "-m", "melody_deploy.verify", str(inventory)],
                            cwd=REPO, capture_output=True, text=True, timeout=60)

    assert result.returncode == 2, result.stdout + result.stderr
    assert "host site-a: setting 'melody_partition_id' = 'zero'" in result.stderr
    assert "HOST" not in result.stdout
