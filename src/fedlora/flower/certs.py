"""TLS certificates and SuperNode keys for a Flower deployment, made with `cryptography`.

Flower 1.41's secure mode needs two things, and this module writes both:

- **TLS** (the SuperLink's `--ssl-ca-certfile/--ssl-certfile/--ssl-keyfile`): a private CA, and a
  server certificate it signs whose subject alternative names are the addresses clients dial
  (for loopback `127.0.0.1` and `localhost`; a client checks the address against them, not the
  common name). SuperNodes and the `flwr` CLI get only `ca.crt` (`--root-certificates`,
  `root-certificates` in the CLI's config.toml).
- **Node authentication** (`--enable-supernode-auth`): one EC key pair per SuperNode, in
  OpenSSH format, which is what Flower reads (`flower-supernode --auth-supernode-private-key`
  loads it with `load_ssh_private_key`, `flwr supernode register` with `load_ssh_public_key`,
  and both insist on a NIST curve). P-384 is the curve Flower's own guide uses.

Private keys are written mode 0600. This is for loopback tests, demos and small pilots; an
institution with a PKI issues the server certificate from it instead (docs/flower.md,
"Secure deployment").

>>> tls = write_tls(tmp / "certs")                                 # doctest: +SKIP
>>> key, pub = write_node_key(tmp / "keys", "supernode-0")         # doctest: +SKIP
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

LOOPBACK = ("127.0.0.1", "localhost")


@dataclass(frozen=True)
class TlsFiles:
    """Paths of what `write_tls` wrote: the CA (give `ca_cert` to every client) and the server's pair."""

    ca_cert: Path
    server_cert: Path
    server_key: Path

    def superlink_args(self) -> list[str]:
        return ["--ssl-ca-certfile", str(self.ca_cert), "--ssl-certfile", str(self.server_cert),
                "--ssl-keyfile", str(self.server_key)]


def _write_private(path: Path, data: bytes) -> None:
    # Created 0600 from the start, so the key is never readable by others, not even briefly.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedlora"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _san(hosts: tuple[str, ...]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def write_tls(folder: str | Path, hosts: tuple[str, ...] = LOOPBACK, days: int = 365) -> TlsFiles:
    """A fresh CA and a server certificate for `hosts`, signed by it, written to `folder`.

    Files: `ca.crt` (public, for every client), `ca.key` (keep offline: it signs servers; it is
    kept here so a second server certificate can be issued), `server.pem`, `server.key`.
    The CA may sign only end-entity certificates (path length 0); the server certificate is
    limited to TLS server use (extended key usage serverAuth)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    start, end = now - dt.timedelta(minutes=5), now + dt.timedelta(days=days)  # 5 min: clock skew

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca = (x509.CertificateBuilder().subject_name(_name("fedlora CA")).issuer_name(_name("fedlora CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(start).not_valid_after(end)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                       key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, key_cert_sign=True, crl_sign=True,
                                       encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))

    key = ec.generate_private_key(ec.SECP384R1())
    server = (x509.CertificateBuilder().subject_name(_name(hosts[0])).issuer_name(ca.subject)
              .public_key(key.public_key()).serial_number(x509.random_serial_number())
              .not_valid_before(start).not_valid_after(end)
              .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
              .add_extension(_san(tuple(hosts)), critical=False)
              .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
              .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                             critical=False)
              .sign(ca_key, hashes.SHA256()))

    files = TlsFiles(folder / "ca.crt", folder / "server.pem", folder / "server.key")
    files.ca_cert.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    _write_private(folder / "ca.key", _pem_key(ca_key))
    files.server_cert.write_bytes(server.public_bytes(serialization.Encoding.PEM))
    _write_private(files.server_key, _pem_key(key))
    return files


def write_node_key(folder: str | Path, name: str) -> tuple[Path, Path]:
    """An EC P-384 key pair for one SuperNode: (`folder/name`, `folder/name.pub`), OpenSSH format,
    like `ssh-keygen -t ecdsa -b 384 -N "" -f folder/name`. The `.pub` file is what the
    coordinator registers (`flwr supernode register`); the private key never leaves the node."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private, public = folder / name, folder / f"{name}.pub"
    _write_private(private, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                              serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                     serialization.PublicFormat.OpenSSH) + f" {name}\n".encode())
    return private, public
