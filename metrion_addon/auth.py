"""Resolving a request's credentials to an account, and the headers to send upstream.

Pure functions over a header mapping: no mitmproxy, no bodies. Tokens are compared as SHA-256 digests with
`hmac.compare_digest` against every configured token, so the time taken does not depend on which (or whether
any) token matched.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from dataclasses import dataclass

from metrion_addon.config import TOKEN_PREFIX, Account, hash_token

METRION_HEADER_PREFIX = "x-metrion-"
TOKEN_HEADER = "x-metrion-token"
USER_HEADER = "x-metrion-user"


@dataclass(frozen=True)
class AuthOk:
    account: Account
    mode: str  # "managed" | "passthrough"
    set_headers: dict[str, str]  # headers to set upstream (managed: the real key)
    remove_headers: tuple[str, ...]  # headers to drop before forwarding (besides every x-metrion-*)
    proxy_token: str = ""  # the proxy token presented: no header that holds it goes upstream
    user: str | None = None  # the user the token is bound to (config `tokens: [{token: ..., user: ...}]`)


@dataclass(frozen=True)
class AuthError:
    message: str
    status: int = 401
    error_type: str = "authentication_error"


class Authenticator:
    def __init__(self, accounts: tuple[Account, ...]) -> None:
        self._table: list[tuple[bytes, Account, str | None]] = [
            (h, a, a.token_users[i] if i < len(a.token_users) else None)
            for a in accounts
            for i, h in enumerate(a.token_hashes)
        ]

    def lookup(self, token: str) -> Account | None:
        found = self.lookup_bound(token)
        return found[0] if found is not None else None

    def lookup_bound(self, token: str) -> tuple[Account, str | None] | None:
        """The token's account and the user it is bound to (None: not bound)."""
        digest = hash_token(token)
        found: tuple[Account, str | None] | None = None
        for h, account, user in self._table:  # no early exit: constant time over the table
            if hmac.compare_digest(h, digest):
                found = (account, user)
        return found

    def authenticate(self, headers: Mapping[str, str]) -> AuthOk | AuthError:
        """Decide managed / pass-through / reject from the request headers (case-insensitive mapping)."""
        credential = client_credential(headers)
        metrion_token = headers.get(TOKEN_HEADER)

        # Managed mode: the client's credential is one of our proxy tokens.
        if credential is not None and (credential.startswith(TOKEN_PREFIX) or metrion_token is None):
            bound = self.lookup_bound(credential)
            account, user = bound if bound is not None else (None, None)
            if account is None:
                if credential.startswith(TOKEN_PREFIX):
                    return AuthError("invalid proxy token: it is not configured in this metrion proxy")
                return AuthError(
                    "this metrion proxy needs a proxy token (sk-metrion-...) as the API key, or your own "
                    "Anthropic key together with an x-metrion-token header"
                )
            if account.anthropic_api_key is None:
                return AuthError(
                    f"account {account.name!r} has no Anthropic key for managed mode; send your own key "
                    "with an x-metrion-token header (pass-through) instead"
                )
            return AuthOk(
                account=account,
                mode="managed",
                set_headers={"x-api-key": account.anthropic_api_key},
                # Any Authorization header goes too: upstream must see only the account's key.
                remove_headers=("authorization",),
                proxy_token=credential,
                user=user,
            )

        # Pass-through: the client's own key/bearer goes upstream untouched, the account comes from the header.
        if metrion_token is not None:
            bound = self.lookup_bound(metrion_token)
            account, user = bound if bound is not None else (None, None)
            if account is None:
                return AuthError("invalid x-metrion-token: it is not configured in this metrion proxy")
            if not account.allow_passthrough:
                return AuthError(f"account {account.name!r} does not allow pass-through; use its proxy token")
            return AuthOk(
                account=account,
                mode="passthrough",
                set_headers={},
                remove_headers=(),
                proxy_token=metrion_token,
                user=user,
            )

        return AuthError(
            "missing credentials: send a proxy token (sk-metrion-...) as x-api-key or Authorization: Bearer, "
            "or your own Anthropic key with an x-metrion-token header"
        )


def client_credential(headers: Mapping[str, str]) -> str | None:
    """The credential the client sent: x-api-key first, then an Authorization Bearer token."""
    key = headers.get("x-api-key")
    if key and key.strip():
        return key.strip()
    scheme, _, value = headers.get("authorization", "").strip().partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return None


def error_body(error_type: str, message: str) -> dict[str, object]:
    """Anthropic's error JSON shape."""
    return {"type": "error", "error": {"type": error_type, "message": message}}
