"""Helpers of the gRPC end-to-end tests: a server on a free localhost port, certificates."""

from __future__ import annotations

import datetime
import ipaddress
import time
from contextlib import contextmanager
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from svda.server.app import BackgroundServer
from svda.server.settings import ServerSettings


@contextmanager
def grpc_server(base, store, **settings):
    """A :class:`BackgroundServer` on free ports (gRPC and metrics) of 127.0.0.1."""
    settings.setdefault("svda_prune_tolerance", 0.0)  # exact: outputs compare token for token
    values = dict(host="127.0.0.1", port=0, metrics_port=0, store=store.root, **settings)
    with BackgroundServer(ServerSettings(**values), base=base, store=store) as server:
        yield server


def target(server: BackgroundServer) -> str:
    return f"127.0.0.1:{server.port}"


def metric(server: BackgroundServer, name: str, **labels) -> float:
    value = server.server.metrics.registry.get_sample_value(name, labels or None)
    return 0.0 if value is None else value


def wait_until(condition, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


# ----- certificates -----------------------------------------------------------------------------
def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write(folder: Path, stem: str, key, cert: x509.Certificate) -> tuple[Path, Path]:
    key_path, cert_path = folder / f"{stem}.key", folder / f"{stem}.crt"
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


def _sign(subject: str, public_key, issuer: str, issuer_key, *, ca: bool, usage=None, sans=()):
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    if usage:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def make_certificates(folder: Path) -> dict[str, Path]:
    """A CA, a server certificate for localhost/127.0.0.1 and a client certificate (PEM files):
    keys ``ca``, ``server_key``, ``server_cert``, ``client_key``, ``client_cert``, and
    ``other_ca`` (an unrelated CA, for a client that must not trust the server)."""
    folder.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = _sign("svda test CA", ca_key.public_key(), "svda test CA", ca_key, ca=True)
    _, out["ca"] = _write(folder, "ca", ca_key, ca_cert)
    other_key = ec.generate_private_key(ec.SECP256R1())
    other = _sign("other CA", other_key.public_key(), "other CA", other_key, ca=True)
    _, out["other_ca"] = _write(folder, "other-ca", other_key, other)
    sans = (x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    for role, usage in (("server", ExtendedKeyUsageOID.SERVER_AUTH),
                        ("client", ExtendedKeyUsageOID.CLIENT_AUTH)):  # fmt: skip
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _sign(f"svda {role}", key.public_key(), "svda test CA", ca_key, ca=False,
                     usage=usage, sans=sans if role == "server" else ())  # fmt: skip
        out[f"{role}_key"], out[f"{role}_cert"] = _write(folder, role, key, cert)
    return out
