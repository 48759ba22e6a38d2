"""Flags read from the flwr releases themselves, for both command-line families."""

import json

import pytest

from melody_deploy import flwr_flags

HELP_TEXT = """usage: flower-x [-h] [--insecure] [--database DATABASE]
                [--old-flag OLD_FLAG]

options:
  -h, --help            show this help message and exit
  --insecure            Run without TLS. Use --database only with care.
  --database DATABASE   Path of the state database.
  --old-flag OLD_FLAG   This argument is deprecated and will be removed in a
                        future release. Use `--database` instead.
"""


def test_parse_help_options_and_deprecated():
    flags = flwr_flags.parse_help(HELP_TEXT)

    assert flags.accepted == {"--insecure", "--database", "--old-flag"}
    assert flags.deprecated == {"--old-flag"}
    assert flags.usable("--database")
    assert not flags.usable("--old-flag")
    assert not flags.usable("--storage-dir")


def test_probe_installed_release_http_family(tmp_path):
    flags = flwr_flags.probe("1.42.0", tmp_path)

    assert flags.superlink.usable("--host")
    assert flags.superlink.usable("--port")
    assert flags.superlink.usable("--disable-runtime-dependency-installation")
    assert "--storage-dir" not in flags.superlink.accepted
    assert "--serverappio-api-address" not in flags.superlink.accepted
    assert not flags.superlink.usable("--fleet-api-address")
    assert flags.supernode.usable("--trusted-entities")
    assert "--clientappio-api-address" not in flags.supernode.accepted


def test_probe_cache_is_reused(tmp_path):
    first = flwr_flags.probe("1.42.0", tmp_path)
    cache_file = tmp_path / "flags-1.42.0.json"
    document = json.loads(cache_file.read_text())
    document["superlink"]["accepted"].append("--from-cache")
    cache_file.write_text(json.dumps(document))

    second = flwr_flags.probe("1.42.0", tmp_path)

    assert "--from-cache" in second.superlink.accepted
    assert second.supernode == first.supernode


def test_probe_grpc_family_release(tmp_path):
    # Installs flwr 1.27.0 from the package index into a probe venv.
    flags = flwr_flags.probe("1.27.0", tmp_path)

    assert flags.superlink.usable("--storage-dir")
    assert flags.superlink.usable("--serverappio-api-address")
    assert flags.superlink.usable("--fleet-api-address")
    assert flags.superlink.usable("--control-api-address")
    assert "--host" not in flags.superlink.accepted
    assert "--disable-runtime-dependency-installation" not in flags.superlink.accepted
    assert flags.supernode.usable("--clientappio-api-address")
    assert not any(path.name.startswith("flwr-1.27.0-") for path in tmp_path.iterdir())


def test_probe_unknown_release_fails(tmp_path):
    with pytest.raises(flwr_flags.DeployError, match="flwr==0.0.1"):
        flwr_flags.probe("0.0.1", tmp_path)
