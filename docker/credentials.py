"""TLS certificates and SuperNode authentication keys for a fedsoft/Flower deployment.

Writes, under ``--out`` (default ``docker/credentials``):

* ``certs/ca.crt``, ``certs/ca.key``: a self-signed CA (RSA 3072). SuperNodes and the ``flwr`` CLI
  get ``ca.crt`` (``--root-certificates`` / ``root-certificates``);
* ``certs/server.pem``, ``certs/server.key``: the server certificate signed by that CA, with
  the subject alternative names of ``--san`` (every host name or IP address SuperNodes and the
  CLI use to reach the SuperLink or its gateways) for ``flower-superlink --ssl-certfile/
  --ssl-keyfile`` and for the nginx gateways in front of it (``docker/gateway/``);
* ``keys/supernode-<i>``, ``keys/supernode-<i>.pub``: one ECDSA P-384 key pair per SuperNode in
  OpenSSH format, the format Flower 1.42 reads: the private key goes to
  ``flower-supernode --auth-supernode-private-key``, the public key to
  ``flwr supernode register``.

Private keys (``ca.key``, ``server.key``, ``supernode-<i>``) are created with mode 0600 from
their first moment (``os.open(..., O_CREAT | O_EXCL, 0o600)`` on a temporary file, then an
atomic rename), never written first and restricted after; public files get 0644.

Existing files are kept (so the command is idempotent and adding SuperNodes later only creates
the new keys); ``--force`` regenerates the certificates. A kept server certificate that lacks one
of the requested names is reported. Only needs the ``cryptography`` package (a dependency of
flwr):

    python docker/credentials.py --supernodes 2 \
        --san superlink,gateway,gateway-admin,localhost,127.0.0.1,10.0.0.5
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import sys
from collections.abc import Iterable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# "superlink": the SuperLink on the compose backend network (the gateways verify it by that name);
# "gateway" / "gateway-admin": the Fleet and Control gateways SuperNodes and the CLI connect to
DEFAULT_SANS = ("superlink", "gateway", "gateway-admin", "localhost", "127.0.0.1", "::1")
DEFAULT_OUT = Path(__file__).resolve().parent / "credentials"
VALID_DAYS = 365


PRIVATE_MODE = 0o600
PUBLIC_MODE = 0o644


def _write(path: Path, data: bytes, private: bool = False) -> None:
    """Write ``path`` atomically; a private key is never readable by anyone but its owner.

    The bytes go to a new temporary file in the same folder, created by ``os.open`` with
    ``O_CREAT | O_EXCL`` and mode 0600 (a private file exists with no other permission bits from
    its first moment, whatever the umask), then ``os.replace`` puts it in place. A public file
    gets 0644 with ``fchmod`` before its contents are written.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = PRIVATE_MODE if private else PUBLIC_MODE
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0),
                 PRIVATE_MODE)
    try:
        with open(fd, "wb", closefd=True) as f:
            os.fchmod(f.fileno(), mode)  # exact mode, independent of the umask
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _san_entries(sans: Iterable[str]) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    for name in sans:
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            out.append(x509.DNSName(name))
    return out


def write_certificates(certs_dir: Path, sans: Iterable[str]) -> None:
    """CA + SuperLink server certificate valid for ``sans`` (host names and IP addresses)."""
    sans = [s.strip() for s in sans if s.strip()]
    if not sans:
        raise ValueError("at least one subject alternative name is needed")
    now = dt.datetime.now(dt.UTC)
    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedsoft deployment CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, sans[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
        .add_extension(x509.SubjectAlternativeName(_san_entries(sans)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    _write(certs_dir / "ca.crt", ca_cert.public_bytes(pem))
    _write(certs_dir / "ca.key", _key_pem(ca_key), private=True)
    _write(certs_dir / "server.pem", cert.public_bytes(pem))
    _write(certs_dir / "server.key", _key_pem(key), private=True)


def write_supernode_key(keys_dir: Path, name: str) -> tuple[Path, Path]:
    """ECDSA P-384 key pair in OpenSSH format: ``<name>`` (private) and ``<name>.pub``."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = keys_dir / name
    public = keys_dir / f"{name}.pub"
    _write(private, key.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.OpenSSH,
                                      serialization.NoEncryption()), private=True)
    _write(public, key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                 serialization.PublicFormat.OpenSSH)
           + f" {name}\n".encode())
    return private, public


def missing_sans(certs_dir: Path, sans: Iterable[str]) -> list[str]:
    """The names of ``sans`` that the existing ``server.pem`` under ``certs_dir`` does not
    carry (empty when it carries all of them or does not exist)."""
    path = Path(certs_dir) / "server.pem"
    if not path.exists():
        return []
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        have: set[str] = set()
    else:
        have = set(ext.get_values_for_type(x509.DNSName))
        have |= {str(ip) for ip in ext.get_values_for_type(x509.IPAddress)}
    out = []
    for name in (s.strip() for s in sans):
        if not name:
            continue
        try:
            name = str(ipaddress.ip_address(name))
        except ValueError:
            pass
        if name not in have:
            out.append(name)
    return out


def generate(out: Path, supernodes: int, sans: Iterable[str] = DEFAULT_SANS,
             force: bool = False) -> list[Path]:
    """Create whatever is missing under ``out``; returns the files written."""
    out = Path(out)
    certs = out / "certs"
    written: list[Path] = []
    names = ("ca.crt", "ca.key", "server.pem", "server.key")
    if force or not all((certs / n).exists() for n in names):
        write_certificates(certs, sans)
        written += [certs / n for n in names]
    for i in range(supernodes):
        if not (out / "keys" / f"supernode-{i}").exists():
            written += list(write_supernode_key(out / "keys", f"supernode-{i}"))
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="output directory (default: docker/credentials)")
    parser.add_argument("--supernodes", type=int, default=2,
                        help="number of SuperNode key pairs (supernode-0 ... supernode-<N-1>)")
    parser.add_argument("--san", action="append", default=None,
                        help="comma-separated host names / IPs the SuperLink is reached at "
                             f"(repeatable; default: {','.join(DEFAULT_SANS)})")
    parser.add_argument("--force", action="store_true", help="regenerate the certificates")
    parser.add_argument("--strict", action="store_true",
                        help="exit with status 3 if a kept server certificate lacks a --san name")
    args = parser.parse_args(argv)
    if args.supernodes < 0:
        parser.error("--supernodes must be >= 0")
    sans = [s for arg in args.san for s in arg.split(",")] if args.san else list(DEFAULT_SANS)
    written = generate(args.out, args.supernodes, sans, force=args.force)
    for path in written:
        print(f"wrote {path}")
    if not written:
        print(f"{args.out}: all credentials already present (use --force for new certificates)")
    missing = missing_sans(args.out / "certs", sans)
    if missing:
        print(f"warning: {args.out / 'certs' / 'server.pem'} does not name {', '.join(missing)}: "
              "clients that use those names will fail TLS verification; rerun with --force "
              "(new CA: copy the new ca.crt to every SuperNode)", file=sys.stderr, flush=True)
        if args.strict:
            sys.exit(3)


if __name__ == "__main__":
    main()
