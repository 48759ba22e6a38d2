"""The SuperLink's TLS files on the operator's machine: generated, renewed or checked.

The deploy either generates a CA and a SuperLink server certificate into
`melody_tls_dir` (keys mode 0600, never printed), or checks the CA,
certificate and key that the operator supplies. Both run before any host is
changed, so a problem stops the deploy with the setting and the fix.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

logger = logging.getLogger("pyinfra")

CA_CERT = "ca.pem"
CA_KEY = "ca.key"
SERVER_CERT = "superlink.pem"
SERVER_KEY = "superlink.key"

# The SuperLink also serves its certificate on loopback: to nginx (which
# checks the DNS name `localhost`), to its own ServerApp processes and to
# researchers' SSH tunnels (which connect to 127.0.0.1).
LOOPBACK_NAMES = ("localhost", "127.0.0.1")

CA_VALID_DAYS = 3650
SUPPLIED_SETTINGS = ("melody_tls_ca_cert", "melody_tls_server_cert", "melody_tls_server_key")


class TlsError(ValueError):
    """The TLS files are missing, do not parse or do not fit together. The message names the fix."""


@dataclass(frozen=True)
class TlsFiles:
    """Paths of the CA certificate, server certificate and server key on the operator's machine."""

    ca_cert: Path
    server_cert: Path
    server_key: Path
    generated: bool


def utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def is_ip_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def certificate_names(certificate: x509.Certificate) -> set[str]:
    """Return the DNS names and IP addresses in the certificate's subject alternative names."""
    try:
        extension = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return set()
    names = set(extension.value.get_values_for_type(x509.DNSName))
    names |= {str(address) for address in extension.value.get_values_for_type(x509.IPAddress)}
    return names


def name_is_covered(name: str, names: set[str]) -> bool:
    if name in names:
        return True
    # A wildcard covers exactly one DNS label, as TLS clients match it.
    if is_ip_address(name) or "." not in name:
        return False
    return f"*.{name.split('.', 1)[1]}" in names


def missing_names(certificate: x509.Certificate, required: list[str]) -> list[str]:
    names = certificate_names(certificate)
    return [name for name in required if not name_is_covered(name, names)]


def load_certificate(path: Path, setting: str) -> x509.Certificate:
    if not path.is_file():
        raise TlsError(f"setting '{setting}' = '{path}' is not a file; give the path of a PEM certificate")
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except ValueError as error:
        raise TlsError(
            f"setting '{setting}' = '{path}' is not a PEM certificate ({error}); "
            f"give a file that starts with -----BEGIN CERTIFICATE-----"
        ) from error


def load_private_key(path: Path, setting: str):
    if not path.is_file():
        raise TlsError(f"setting '{setting}' = '{path}' is not a file; give the path of a PEM private key")
    try:
        return serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as error:
        # cryptography 42+ reports why parsing failed, without the key's bytes.
        raise TlsError(
            f"setting '{setting}' = '{path}' is not an unencrypted PEM private key ({error}); "
            f"give the key without a passphrase, for example after `openssl pkey -in KEY -out KEY.pem`"
        ) from error


def public_bytes(key) -> bytes:
    """Return the DER public key of a public or private key, to compare key pairs."""
    if hasattr(key, "private_bytes"):
        key = key.public_key()
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def check_validity(certificate: x509.Certificate, setting: str, path: Path, now: datetime.datetime) -> None:
    if certificate.not_valid_after_utc <= now:
        raise TlsError(
            f"setting '{setting}' = '{path}' expired on {certificate.not_valid_after_utc:%Y-%m-%d}; "
            f"give a certificate that is valid now"
        )
    if certificate.not_valid_before_utc > now:
        raise TlsError(
            f"setting '{setting}' = '{path}' is not valid before "
            f"{certificate.not_valid_before_utc:%Y-%m-%d %H:%M} UTC; check the clock or the certificate"
        )


def check_issued_by(certificate: x509.Certificate, ca: x509.Certificate, cert_setting: str, ca_setting: str) -> None:
    try:
        certificate.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as error:
        raise TlsError(
            f"setting '{cert_setting}' was not issued by the CA in '{ca_setting}' ({error}); "
            f"give the CA certificate that signed the server certificate"
        ) from error


def check_supplied(settings: dict, required_names: list[str], now: datetime.datetime | None = None) -> TlsFiles:
    """Check the operator's CA, certificate and key, and raise TlsError naming the first problem."""
    now = now or utc_now()
    paths = {key: Path(settings[key]).expanduser() for key in SUPPLIED_SETTINGS}
    ca = load_certificate(paths["melody_tls_ca_cert"], "melody_tls_ca_cert")
    certificate = load_certificate(paths["melody_tls_server_cert"], "melody_tls_server_cert")
    key = load_private_key(paths["melody_tls_server_key"], "melody_tls_server_key")

    if public_bytes(key) != public_bytes(certificate.public_key()):
        raise TlsError(
            f"setting 'melody_tls_server_key' = '{paths['melody_tls_server_key']}' is not the key of "
            f"'melody_tls_server_cert' = '{paths['melody_tls_server_cert']}'; give the matching key"
        )
    check_issued_by(certificate, ca, "melody_tls_server_cert", "melody_tls_ca_cert")
    check_validity(ca, "melody_tls_ca_cert", paths["melody_tls_ca_cert"], now)
    check_validity(certificate, "melody_tls_server_cert", paths["melody_tls_server_cert"], now)

    missing = missing_names(certificate, required_names)
    if missing:
        raise TlsError(
            f"setting 'melody_tls_server_cert' = '{paths['melody_tls_server_cert']}' does not name "
            f"{', '.join(missing)}; SuperNodes and the SuperLink's loopback clients check these names, "
            f"so issue a certificate whose subject alternative names include all of: "
            f"{', '.join(required_names)}"
        )
    return TlsFiles(paths["melody_tls_ca_cert"], paths["melody_tls_server_cert"],
                    paths["melody_tls_server_key"], generated=False)


def write_private(path: Path, data: bytes) -> None:
    """Write a file readable by its owner only, replacing it atomically."""
    temporary = path.with_name(path.name + ".tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(data)
    os.replace(temporary, path)


def write_public(path: Path, data: bytes) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_bytes(data)
    temporary.chmod(0o644)
    os.replace(temporary, path)


def pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def pem_certificate(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


def subject_names(names: list[str]) -> list[x509.GeneralName]:
    result: list[x509.GeneralName] = []
    for name in names:
        if is_ip_address(name):
            result.append(x509.IPAddress(ipaddress.ip_address(name)))
        else:
            result.append(x509.DNSName(name))
    return result


def create_ca(now: datetime.datetime):
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "MELODY federation CA")])
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CA_VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=False, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, certificate


def create_server_certificate(ca_key, ca: x509.Certificate, names: list[str], valid_days: int,
                              now: datetime.datetime):
    key = ec.generate_private_key(ec.SECP256R1())
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=valid_days))
        .add_extension(x509.SubjectAlternativeName(subject_names(names)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return key, certificate


def server_renewal_reason(folder: Path, ca: x509.Certificate, names: list[str], renew_days: int,
                          now: datetime.datetime) -> str | None:
    """Return why the generated server certificate must be (re)made, or None to keep it."""
    cert_path, key_path = folder / SERVER_CERT, folder / SERVER_KEY
    if not cert_path.is_file() or not key_path.is_file():
        return "it does not exist yet"
    certificate = load_certificate(cert_path, "melody_tls_dir")
    key = load_private_key(key_path, "melody_tls_dir")
    if public_bytes(key) != public_bytes(certificate.public_key()):
        return "its key does not match it"
    try:
        certificate.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return "the CA changed"
    if certificate.not_valid_after_utc <= now + datetime.timedelta(days=renew_days):
        return f"it expires on {certificate.not_valid_after_utc:%Y-%m-%d}, within {renew_days} days"
    if sorted(certificate_names(certificate)) != sorted(names):
        return "the SuperLink's names changed"
    return None


def ensure_generated(folder: Path, names: list[str], valid_days: int, renew_days: int,
                     now: datetime.datetime | None = None) -> TlsFiles:
    """Create or renew the CA and server certificate in `folder`, keeping them while still valid."""
    now = now or utc_now()
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)

    ca_path, ca_key_path = folder / CA_CERT, folder / CA_KEY
    ca_reason = None
    if not ca_path.is_file() or not ca_key_path.is_file():
        ca_reason = "it does not exist yet"
    else:
        ca = load_certificate(ca_path, "melody_tls_dir")
        ca_key = load_private_key(ca_key_path, "melody_tls_dir")
        if public_bytes(ca_key) != public_bytes(ca.public_key()):
            raise TlsError(
                f"setting 'melody_tls_dir' = '{folder}': {CA_KEY} is not the key of {CA_CERT}; "
                f"move the folder away to create a new CA, then deploy the SuperLink and every SuperNode"
            )
        if ca.not_valid_after_utc <= now + datetime.timedelta(days=renew_days):
            ca_reason = f"it expires on {ca.not_valid_after_utc:%Y-%m-%d}, within {renew_days} days"
    if ca_reason:
        ca_key, ca = create_ca(now)
        write_private(ca_key_path, pem_key(ca_key))
        write_public(ca_path, pem_certificate(ca))
        logger.warning("TLS: created a new CA in %s because %s; deploy the SuperLink and every "
                       "SuperNode so they trust it", folder, ca_reason)

    reason = server_renewal_reason(folder, ca, names, renew_days, now)
    if reason:
        key, certificate = create_server_certificate(ca_key, ca, names, valid_days, now)
        write_private(folder / SERVER_KEY, pem_key(key))
        write_public(folder / SERVER_CERT, pem_certificate(certificate))
        logger.warning("TLS: issued a new SuperLink certificate for %s, valid until %s, because %s",
                       ", ".join(names), f"{certificate.not_valid_after_utc:%Y-%m-%d}", reason)
    return TlsFiles(ca_path, folder / SERVER_CERT, folder / SERVER_KEY, generated=True)
