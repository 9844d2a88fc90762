"""Bearer tokens bound to tenants, TLS and mutual TLS with certificates made in the test."""

from __future__ import annotations

import grpc
import pytest

from svda.client import Client, SvdaClientError
from tests.server.grpc_fixtures import grpc_server, make_certificates, target

S = grpc.StatusCode
ACME, GLOBEX, ADMIN = "acme-token-0123456789", "globex-token-0123456789", "admin-token-0123456789"


@pytest.fixture
def tokens_file(tmp_path):
    path = tmp_path / "tokens.txt"
    path.write_text(f"{ACME} acme\n{GLOBEX} globex\n{ADMIN} admin\n")
    return path


def _status(call) -> grpc.StatusCode:
    with pytest.raises(SvdaClientError) as info:
        call()
    return info.value.code


def test_tokens_and_tenants(tiny_base, store, adapter_bytes, tokens_file):
    with grpc_server(tiny_base, store, tokens_file=tokens_file) as server:
        address = target(server)
        with Client(address) as anonymous, Client(address, token="x" * 20) as stranger:
            assert _status(anonymous.info) == S.UNAUTHENTICATED
            assert _status(lambda: anonymous.generate("hi")) == S.UNAUTHENTICATED
            assert _status(stranger.list_adapters) == S.UNAUTHENTICATED
        with Client(address, token=ACME) as acme, Client(address, token=GLOBEX) as globex:
            assert acme.info().tenant == "acme" and acme.info().auth_enabled
            entry = acme.upload_adapter(adapter_bytes["lora-a"], "acme-private")
            assert entry.tenant == "acme"
            assert acme.generate("hi", adapter="acme-private", max_new_tokens=2).adapter_id
            assert acme.generate("hi", adapter="svda-b", max_new_tokens=2)  # shared: allowed
            # another tenant's adapter: invisible to globex
            assert _status(lambda: globex.generate("hi", adapter="acme-private")) == S.NOT_FOUND
            assert _status(lambda: globex.load_adapter("acme-private")) == S.NOT_FOUND
            assert _status(lambda: globex.pin_adapter("svda-b")) == S.PERMISSION_DENIED  # shared
            assert {e.adapter_id for e in globex.list_adapters()} == {"lora-a", "svda-b"}
            # ids are per tenant: globex's own "acme-private" is a second, separate adapter
            theirs = globex.upload_adapter(adapter_bytes["svda-b"], "acme-private")
            assert (theirs.tenant, theirs.version, theirs.method) == ("globex", 1, "svda")
            assert globex.generate("hi", adapter="acme-private", max_new_tokens=2).adapter_id
            own = [e for e in acme.list_adapters() if e.adapter_id == "acme-private"]
            assert [(e.tenant, e.method) for e in own] == [("acme", "lora")]
            assert {e.adapter_id for e in acme.list_adapters()} == {
                "lora-a",
                "svda-b",
                "acme-private",
            }
        with Client(address, token=ADMIN) as admin:
            assert admin.info().tenant is None  # admin calls see everything
            tenants = {e.tenant for e in admin.list_adapters() if e.adapter_id == "acme-private"}
            assert tenants == {"acme", "globex"}
            assert admin.upload_adapter(adapter_bytes["svda-b"], "shared-2").tenant is None


def test_tls(tiny_base, store, tmp_path):
    certs = make_certificates(tmp_path / "certs")
    tls = dict(tls_cert=certs["server_cert"], tls_key=certs["server_key"])
    with grpc_server(tiny_base, store, **tls) as server:
        address = f"localhost:{server.port}"
        with Client(address, ca_cert=certs["ca"]) as client:
            assert client.generate("hi", max_new_tokens=2).completion_tokens == 2
        with Client(f"127.0.0.1:{server.port}", ca_cert=certs["ca"].read_bytes()) as client:
            assert client.info().base_model  # the certificate names 127.0.0.1 too
        with Client(address, timeout=5) as plaintext:
            assert _status(plaintext.info) == S.UNAVAILABLE
        with Client(address, ca_cert=certs["other_ca"], timeout=5) as untrusting:
            assert _status(untrusting.info) == S.UNAVAILABLE


def test_mutual_tls(tiny_base, store, tmp_path):
    certs = make_certificates(tmp_path / "certs")
    mtls = dict(
        tls_cert=certs["server_cert"], tls_key=certs["server_key"], tls_client_ca=certs["ca"]
    )
    with grpc_server(tiny_base, store, **mtls) as server:
        address = f"localhost:{server.port}"
        client_pair = dict(client_cert=certs["client_cert"], client_key=certs["client_key"])
        with Client(address, ca_cert=certs["ca"], **client_pair) as client:
            assert client.info().base_model
        with Client(address, ca_cert=certs["ca"], timeout=5) as no_cert:
            assert _status(no_cert.info) == S.UNAVAILABLE
    with pytest.raises(ValueError, match="both client_cert and client_key"):
        Client(address, ca_cert=certs["ca"], client_cert=certs["client_cert"])
