"""TLS files and security settings: generation, renewal, and bad input that stops preflight."""

from __future__ import annotations

import copy
import datetime
import stat

import pytest
from cryptography import x509

from melody_deploy import tls
from melody_deploy.errors import PreflightError
from melody_deploy.preflight import HostSpec, validate_inventory
from melody_deploy.security import prepare_tls, superlink_names

NAMES = ["link", "link.example", "localhost", "127.0.0.1"]
NOW = datetime.datetime(2027, 1, 10, tzinfo=datetime.timezone.utc)


def specs(**superlink_data) -> list[HostSpec]:
    return [
        HostSpec("link", ("superlink",), {"ssh_hostname": "link.example", **superlink_data}),
        HostSpec("site-a", ("supernodes",), {"melody_partition_id": 0, "melody_data_dir": "/srv/a"}),
    ]


def read_certificate(path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def write_supplied(folder, names=NAMES, now=None, valid_days=365):
    """Write a CA, certificate and key as an operator would supply them; return the settings."""
    now = now or tls.utc_now()
    ca_key, ca = tls.create_ca(now)
    key, certificate = tls.create_server_certificate(ca_key, ca, names, valid_days, now)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ca.pem").write_bytes(tls.pem_certificate(ca))
    (folder / "server.pem").write_bytes(tls.pem_certificate(certificate))
    (folder / "server.key").write_bytes(tls.pem_key(key))
    return {
        "melody_tls_ca_cert": str(folder / "ca.pem"),
        "melody_tls_server_cert": str(folder / "server.pem"),
        "melody_tls_server_key": str(folder / "server.key"),
    }


def test_generated_files_private_and_named(tmp_path):
    folder = tmp_path / "tls"

    files = tls.ensure_generated(folder, NAMES, valid_days=365, renew_days=30, now=NOW)

    certificate = read_certificate(files.server_cert)
    assert tls.certificate_names(certificate) == set(NAMES)
    certificate.verify_directly_issued_by(read_certificate(files.ca_cert))
    assert certificate.not_valid_after_utc > NOW + datetime.timedelta(days=364)
    for key in (folder / tls.CA_KEY, folder / tls.SERVER_KEY):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700


def test_generated_kept_when_still_valid(tmp_path):
    folder = tmp_path / "tls"
    tls.ensure_generated(folder, NAMES, 365, 30, now=NOW)
    before = (folder / tls.SERVER_CERT).read_bytes()

    tls.ensure_generated(folder, NAMES, 365, 30, now=NOW + datetime.timedelta(days=300))

    assert (folder / tls.SERVER_CERT).read_bytes() == before


def test_generated_renewed_within_window(tmp_path):
    folder = tmp_path / "tls"
    tls.ensure_generated(folder, NAMES, 365, 30, now=NOW)
    ca_before = (folder / tls.CA_CERT).read_bytes()
    later = NOW + datetime.timedelta(days=340)

    tls.ensure_generated(folder, NAMES, 365, 30, now=later)

    renewed = read_certificate(folder / tls.SERVER_CERT)
    assert renewed.not_valid_after_utc > later + datetime.timedelta(days=364)
    assert (folder / tls.CA_CERT).read_bytes() == ca_before


def test_generated_reissued_when_names_change(tmp_path):
    folder = tmp_path / "tls"
    tls.ensure_generated(folder, NAMES, 365, 30, now=NOW)

    tls.ensure_generated(folder, [*NAMES, "alias.example"], 365, 30, now=NOW)

    assert "alias.example" in tls.certificate_names(read_certificate(folder / tls.SERVER_CERT))


def test_superlink_names_cover_addresses():
    federation = validate_inventory([
        HostSpec("link", ("superlink",), {"ssh_hostname": "10.0.0.5", "melody_tls_names": ["fl.example"]}),
        HostSpec("site-a", ("supernodes",), {
            "melody_partition_id": 0, "melody_data_dir": "/srv/a",
            "melody_superlink_address": "10.0.0.5:8000",
        }),
    ])

    assert superlink_names(federation) == ["link", "10.0.0.5", "fl.example", "localhost", "127.0.0.1"]


def test_supplied_files_accepted(tmp_path):
    settings = write_supplied(tmp_path / "operator")

    files = tls.check_supplied(settings, NAMES)

    assert not files.generated
    assert str(files.server_key) == settings["melody_tls_server_key"]


def test_wildcard_name_covers_one_label(tmp_path):
    settings = write_supplied(tmp_path / "operator", names=["*.tre.example", "localhost", "127.0.0.1"])

    tls.check_supplied(settings, ["link.tre.example", "localhost", "127.0.0.1"])
    with pytest.raises(tls.TlsError, match="does not name a.link.tre.example"):
        tls.check_supplied(settings, ["a.link.tre.example", "localhost", "127.0.0.1"])


def supplied_problem(tmp_path, change) -> str:
    settings = write_supplied(tmp_path / "operator")
    change(settings, tmp_path)
    with pytest.raises(PreflightError) as caught:
        prepare_tls(validate_inventory(specs(**settings)))
    return str(caught.value)


def missing_cert(settings, tmp_path):
    settings["melody_tls_server_cert"] = str(tmp_path / "absent.pem")


def other_key(settings, tmp_path):
    other = write_supplied(tmp_path / "other")
    settings["melody_tls_server_key"] = other["melody_tls_server_key"]


def other_ca(settings, tmp_path):
    other = write_supplied(tmp_path / "other")
    settings["melody_tls_ca_cert"] = other["melody_tls_ca_cert"]


def wrong_names(settings, tmp_path):
    settings.update(write_supplied(tmp_path / "wrong", names=["elsewhere.example", "localhost", "127.0.0.1"]))


def no_loopback_names(settings, tmp_path):
    settings.update(write_supplied(tmp_path / "public", names=["link", "link.example"]))


def expired(settings, tmp_path):
    long_ago = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=400)
    settings.update(write_supplied(tmp_path / "old", now=long_ago, valid_days=30))


def key_not_parsing(settings, tmp_path):
    garbled = tmp_path / "garbled.key"
    garbled.write_text("-----BEGIN PRIVATE KEY-----\nnot base64 at all\n-----END PRIVATE KEY-----\n")
    settings["melody_tls_server_key"] = str(garbled)


def cert_not_parsing(settings, tmp_path):
    text = tmp_path / "notes.pem"
    text.write_text("this is not a certificate\n")
    settings["melody_tls_server_cert"] = str(text)


BAD_TLS_FILES = [
    pytest.param(missing_cert, ["melody_tls_server_cert", "absent.pem", "is not a file"], id="missing-cert"),
    pytest.param(other_key, ["melody_tls_server_key", "is not the key of", "give the matching key"],
                 id="mismatched-key"),
    pytest.param(other_ca, ["was not issued by the CA in 'melody_tls_ca_cert'"], id="other-ca"),
    pytest.param(wrong_names, ["melody_tls_server_cert", "does not name link, link.example",
                               "subject alternative names"], id="names-not-superlink"),
    pytest.param(no_loopback_names, ["does not name localhost, 127.0.0.1"], id="no-loopback-names"),
    pytest.param(expired, ["melody_tls_server_cert", "expired on", "valid now"], id="expired"),
    pytest.param(key_not_parsing, ["melody_tls_server_key", "is not an unencrypted PEM private key"],
                 id="key-not-parsing"),
    pytest.param(cert_not_parsing, ["melody_tls_server_cert", "is not a PEM certificate"], id="cert-not-parsing"),
]


@pytest.mark.parametrize("change, expected", BAD_TLS_FILES)
def test_bad_tls_files_rejected(tmp_path, change, expected):
    message = supplied_problem(tmp_path, change)

    assert "host link:" in message
    for part in expected:
        assert part in message


def test_supplied_key_never_in_message(tmp_path):
    message = supplied_problem(tmp_path, other_key)

    assert "PRIVATE KEY" not in message


def test_generated_key_not_parsing_rejected(tmp_path):
    folder = tmp_path / "tls"
    tls.ensure_generated(folder, NAMES, 365, 30, now=NOW)
    (folder / tls.CA_KEY).write_text("garbage\n")

    with pytest.raises(PreflightError) as caught:
        prepare_tls(validate_inventory(specs(melody_tls_dir=str(folder))))

    assert "setting 'melody_tls_dir'" in str(caught.value)


def problems_of(data: dict) -> str:
    with pytest.raises(PreflightError) as caught:
        validate_inventory(specs(**data))
    return str(caught.value)


BAD_SETTINGS = [
    pytest.param({"melody_researcher_networks": ["10.20.0.0/33"]},
                 ["melody_researcher_networks", "'10.20.0.0/33'", "not an IP network", "CIDR"], id="prefix-too-long"),
    pytest.param({"melody_researcher_networks": ["researchers.example"]},
                 ["'researchers.example'", "not an IP network"], id="name-not-network"),
    pytest.param({"melody_researcher_networks": ["10.20.0.7/24"]},
                 ["'10.20.0.7/24'", "host bits set"], id="host-bits-set"),
    pytest.param({"melody_researcher_ssh_keys": ["ssh-ed25519 AAAAnot-a-key alice"]},
                 ["melody_researcher_ssh_keys", "does not parse"], id="ssh-key-not-parsing"),
    pytest.param({"melody_researcher_ssh_keys": ['from="*" ssh-ed25519 AAAA']},
                 ["melody_researcher_ssh_keys", "without options"], id="ssh-key-with-options"),
    pytest.param({"melody_tls_server_cert": "/tmp/server.pem"},
                 ["melody_tls_server_cert set without melody_tls_ca_cert, melody_tls_server_key"], id="partial-tls"),
    pytest.param({"melody_tls_renew_days": 400},
                 ["melody_tls_renew_days", "is not below melody_tls_valid_days"], id="renew-beyond-validity"),
    pytest.param({"melody_superlink_internal_port": 8000},
                 ["melody_superlink_internal_port", "equals melody_superlink_port"], id="internal-port-clash"),
    pytest.param({"melody_control_user": "Researchers"},
                 ["melody_control_user", "not a valid system user"], id="control-user"),
]


@pytest.mark.parametrize("data, expected", BAD_SETTINGS)
def test_bad_security_settings_rejected(data, expected):
    message = problems_of(copy.deepcopy(data))

    assert "no host was changed" in message
    for part in expected:
        assert part in message
