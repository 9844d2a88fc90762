"""Bearer-token authentication: each token is bound to one tenant.

A token file holds ``token -> tenant`` pairs, in one of these forms (chosen by the suffix):

* ``.json`` / ``.yaml`` / ``.yml``: a mapping ``{token: tenant}``, or
  ``{"tokens": [{"token": ..., "tenant": ...}, ...]}``;
* anything else: one ``TOKEN TENANT`` pair per line; blank lines and ``#`` comments are skipped.

Clients send ``authorization: Bearer <token>`` metadata. A token bound to the *admin tenant*
(``--admin-tenant``, default ``admin``) makes admin calls: it sees every tenant's adapters and
uploads into the shared namespace. Without a token file authentication is off and every call is
an admin call. Tokens are kept only as SHA-256 digests and compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import yaml

from .domain import Unauthenticated

MIN_TOKEN_CHARS = 16
_TENANT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class TokenFileError(ValueError):
    """The token file is missing or malformed (raised at server start)."""


@dataclass(frozen=True)
class Caller:
    """Who makes a call: ``tenant`` None is an admin call (or authentication is off)."""

    tenant: str | None
    authenticated: bool


class Authenticator:
    """Maps bearer tokens to tenants; ``Authenticator.disabled()`` lets every call through."""

    def __init__(self, pairs: Iterable[tuple[str, str]], admin_tenant: str = "admin") -> None:
        self.admin_tenant = admin_tenant
        self._digests: list[tuple[bytes, str]] = []
        for token, tenant in pairs:
            _check_pair(token, tenant)
            self._digests.append((_digest(token), tenant))
        self.enabled = bool(self._digests)

    @classmethod
    def disabled(cls) -> Authenticator:
        return cls(())

    @classmethod
    def from_file(cls, path: str | Path, admin_tenant: str = "admin") -> Authenticator:
        pairs = read_token_file(path)
        if not pairs:
            raise TokenFileError(f"token file {path} holds no tokens; add `TOKEN TENANT` lines")
        return cls(pairs, admin_tenant)

    def authenticate(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> Caller:
        """The caller of a request with this invocation metadata; raises ``Unauthenticated``."""
        if not self.enabled:
            return Caller(tenant=None, authenticated=False)
        token = _bearer_token(metadata or ())
        digest = _digest(token)
        tenant = None
        for known, owner in self._digests:  # every entry is compared: no early exit
            if hmac.compare_digest(known, digest):
                tenant = owner
        if tenant is None:
            raise Unauthenticated("unknown bearer token; ask the server operator for a valid one")
        return Caller(tenant=None if tenant == self.admin_tenant else tenant, authenticated=True)


def _bearer_token(metadata: Iterable[tuple[str, str | bytes]]) -> str:
    values = [v for k, v in metadata if k.lower() == "authorization"]
    if not values:
        raise Unauthenticated(
            "this server requires a bearer token: send metadata `authorization: Bearer <token>` "
            "(svda-client --token, or the SVDA_TOKEN environment variable)"
        )
    value = values[0].decode() if isinstance(values[0], bytes) else values[0]
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated("malformed authorization metadata; expected `Bearer <token>`")
    return token.strip()


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def _check_pair(token: object, tenant: object) -> None:
    if not isinstance(token, str) or len(token) < MIN_TOKEN_CHARS or not token.isprintable():
        raise TokenFileError(
            f"every token must be a printable string of at least {MIN_TOKEN_CHARS} characters "
            "(e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)"
        )
    if any(c.isspace() for c in token):
        raise TokenFileError("tokens may not contain whitespace")
    if not isinstance(tenant, str) or not _TENANT_RE.fullmatch(tenant) or ".." in tenant:
        raise TokenFileError(
            f"invalid tenant {tenant!r}: use 1-128 characters from [A-Za-z0-9._-], "
            "starting with a letter or digit"
        )


def read_token_file(path: str | Path) -> list[tuple[str, str]]:
    """``(token, tenant)`` pairs of a token file (see the module docstring for the formats)."""
    path = Path(path).expanduser()
    try:
        text = path.read_text()
    except OSError as exc:
        raise TokenFileError(f"cannot read token file {path}: {exc.strerror or exc}") from exc
    if path.suffix.lower() in (".json", ".yaml", ".yml"):
        return _pairs_from_document(path, text)
    pairs = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        fields = line.split()
        if len(fields) != 2:
            raise TokenFileError(
                f"{path}:{number}: expected `TOKEN TENANT`, got {len(fields)} fields"
            )
        pairs.append((fields[0], fields[1]))
    return pairs


def _pairs_from_document(path: Path, text: str) -> list[tuple[str, str]]:
    try:
        doc = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise TokenFileError(f"token file {path} is not valid {path.suffix[1:]}: {exc}") from exc
    if isinstance(doc, dict) and isinstance(doc.get("tokens"), list):
        try:
            return [(item["token"], item["tenant"]) for item in doc["tokens"]]
        except (TypeError, KeyError) as exc:
            raise TokenFileError(
                f"{path}: each entry of `tokens` needs `token` and `tenant`"
            ) from exc
    if isinstance(doc, dict):
        return [(k, v) for k, v in doc.items()]
    raise TokenFileError(f"{path}: expected a mapping token -> tenant or a `tokens:` list")
