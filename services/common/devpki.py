"""A throw-away certificate authority for local TLS / mTLS (tests, the local stack, a laptop cluster).

Production certificates come from the cluster's issuer (cert-manager); this writes the same shape of
files so that the services can be run with IEX_TLS_* locally:

    python -m services.common.devpki DIR [--server NAME ...] [--client NAME ...]

writes DIR/ca.pem (and ca.key), DIR/<name>.pem + DIR/<name>.key for each server certificate (valid
for NAME, localhost, 127.0.0.1 and ::1) and each client certificate (common name NAME). Keys are
written 0600. Needs the `cryptography` package (a development dependency).
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

LOCAL_NAMES = ("localhost",)
LOCAL_ADDRESSES = ("127.0.0.1", "::1")


@dataclass(frozen=True)
class Issued:
    cert: Path
    key: Path


def _write(path: Path, data: bytes, private: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    os.replace(tmp, path)
    return path


class DevCA:
    """A CA key and certificate; issues server and client certificates signed by it."""

    def __init__(self, directory: Path, common_name: str = "iex development CA", days: int = 30) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        self._x509, self._hashes, self._ser, self._ec, self._oid = x509, hashes, serialization, ec, NameOID
        self.directory = Path(directory)
        self.days = days
        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        now = dt.datetime.now(dt.timezone.utc)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.ca_path = _write(self.directory / "ca.pem", self.cert.public_bytes(serialization.Encoding.PEM))
        _write(self.directory / "ca.key", self._key_pem(self.key), private=True)

    def _key_pem(self, key) -> bytes:
        ser = self._ser
        return key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.PKCS8, ser.NoEncryption())

    def _issue(self, file_name: str, common_name: str, dns: Iterable[str], addresses: Iterable[str], usages, days: int | None = None) -> Issued:
        x509, hashes, ser = self._x509, self._hashes, self._ser
        key = self._ec.generate_private_key(self._ec.SECP256R1())
        now = dt.datetime.now(dt.timezone.utc)
        alt = [x509.DNSName(n) for n in dict.fromkeys(dns)] + [x509.IPAddress(ipaddress.ip_address(a)) for a in dict.fromkeys(addresses)]
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(self._oid.COMMON_NAME, common_name)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days or self.days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(list(usages)), critical=False)
        )
        if alt:
            builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        return Issued(
            cert=_write(self.directory / f"{file_name}.pem", cert.public_bytes(ser.Encoding.PEM)),
            key=_write(self.directory / f"{file_name}.key", self._key_pem(key), private=True),
        )

    def server(self, name: str, extra_names: Iterable[str] = (), file_name: str | None = None) -> Issued:
        """A server certificate for `name` (and localhost, 127.0.0.1, ::1), also usable as a client certificate."""
        from cryptography.x509.oid import ExtendedKeyUsageOID

        # Services are clients of each other too, so their certificates serve both ends of mTLS.
        usages = (ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH)
        return self._issue(file_name or name, name, [name, *extra_names, *LOCAL_NAMES], LOCAL_ADDRESSES, usages)

    def client(self, name: str, file_name: str | None = None) -> Issued:
        """A client certificate whose identity (common name and DNS SAN) is `name`."""
        from cryptography.x509.oid import ExtendedKeyUsageOID

        return self._issue(file_name or name, name, [name], (), (ExtendedKeyUsageOID.CLIENT_AUTH,))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.common.devpki", description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument("--server", action="append", default=[], help="server certificate name (repeatable); default: every service")
    parser.add_argument("--client", action="append", default=[], help="client certificate name (repeatable)")
    parser.add_argument("--days", type=int, default=30)
    args = parser.parse_args(argv)
    from services.common.endpoints import SERVICE_PORTS

    ca = DevCA(args.directory, days=args.days)
    for name in args.server or list(SERVICE_PORTS):
        ca.server(name)
    for name in args.client:
        ca.client(name)
    print(f"CA: {ca.ca_path}; certificates in {args.directory}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
