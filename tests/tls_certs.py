"""X.509 files for the TLS tests, laid out as QEMU's tls-creds-x509 reads them (one directory
per endpoint: ca-cert.pem, server-cert.pem/server-key.pem or client-cert.pem/client-key.pem),
made with the `cryptography` package: a test CA, a rogue CA nobody trusts, and the good and bad
certificates each refusal case needs.
"""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

#: The source certificate's subject as RFC 4514 writes it (what authz-simple compares).
SOURCE_IDENTITY = "CN=source.tern.test,O=tern tests"
INTRUDER_IDENTITY = "CN=intruder.tern.test,O=tern tests"


def _name(common: str, organisation: str = "tern tests") -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, organisation),
                      x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _key():
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _pem(certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


class Authority:
    def __init__(self, name: str):
        self.key = _key()
        now = datetime.datetime.now(datetime.timezone.utc)
        self.name = _name(name)
        self.certificate = (
            x509.CertificateBuilder().subject_name(self.name).issuer_name(self.name)
            .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .sign(self.key, hashes.SHA256()))

    def issue(self, subject: x509.Name, *, server: bool, names=(), expired: bool = False):
        key = _key()
        now = datetime.datetime.now(datetime.timezone.utc)
        if expired:
            start, end = now - datetime.timedelta(days=10), now - datetime.timedelta(days=1)
        else:
            start, end = now - datetime.timedelta(days=1), now + datetime.timedelta(days=30)
        builder = (
            x509.CertificateBuilder().subject_name(subject).issuer_name(self.name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False))
        if names:
            alternatives = []
            for name in names:
                try:
                    alternatives.append(x509.IPAddress(ipaddress.ip_address(name)))
                except ValueError:
                    alternatives.append(x509.DNSName(name))
            builder = builder.add_extension(x509.SubjectAlternativeName(alternatives), critical=False)
        return key, builder.sign(self.key, hashes.SHA256())


def make_pki(root: Path) -> dict[str, str]:
    """Writes every credentials directory under `root`; returns their paths by name:
    server, client (the good pair), server-expired, server-untrusted (a client that trusts only
    the rogue CA, so the good server looks untrusted), client-nocert, client-rogue (signed by
    the rogue CA), client-expired, client-intruder (a good signature, another identity)."""
    ca = Authority("tern test CA")
    rogue = Authority("rogue CA")
    layout: dict[str, tuple] = {}

    def write(name: str, trusted: Authority, endpoint: str, pair=None) -> None:
        directory = root / name
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "ca-cert.pem").write_bytes(_pem(trusted.certificate))
        if pair is not None:
            key, certificate = pair
            (directory / f"{endpoint}-cert.pem").write_bytes(_pem(certificate))
            (directory / f"{endpoint}-key.pem").write_bytes(_pem_key(key))
        layout[name] = directory

    server_names = ("localhost", "127.0.0.1", "destination.tern.test")
    write("server", ca, "server", ca.issue(_name("destination.tern.test"), server=True, names=server_names))
    write("server-expired", ca, "server", ca.issue(_name("destination.tern.test"), server=True, names=server_names,
                                                   expired=True))
    write("client", ca, "client", ca.issue(_name("source.tern.test"), server=False))
    write("server-untrusted", rogue, "client", ca.issue(_name("source.tern.test"), server=False))
    write("client-nocert", ca, "client")
    write("client-rogue", ca, "client", rogue.issue(_name("source.tern.test"), server=False))
    write("client-expired", ca, "client", ca.issue(_name("source.tern.test"), server=False, expired=True))
    write("client-intruder", ca, "client", ca.issue(_name("intruder.tern.test"), server=False))
    return {name: str(path) for name, path in layout.items()}


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 2:
        sys.exit("usage: tests/tls_certs.py DIRECTORY   (writes server/, client/ and the bad cases' directories)")
    for name, path in make_pki(Path(sys.argv[1])).items():
        print(f"{name:18s} {path}")
