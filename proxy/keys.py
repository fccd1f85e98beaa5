"""API keys: how they are made, how they look, and the digest that is all we store.

A key reads `lgk_<key id>_<secret>`. The key id is public: it names the key in the
admin CLI and in the request log. The secret is 256 bits from `secrets`. Only the
SHA-256 digest of the whole key is stored; a plain hash is enough because the secret is
random and long, so there is nothing for a slow hash to protect against.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

KEY_PREFIX = "lgk_"
KEY_ID_HEX_CHARS = 12
SECRET_BYTES = 32  # 256 bits
MAX_KEY_LENGTH = 200


@dataclass(frozen=True)
class NewKey:
    """A freshly generated key: shown once to the operator, then only its digest is kept."""

    key_id: str
    secret_key: str
    digest: bytes


def generate_key() -> NewKey:
    """A new random key, with its public id and its digest."""
    key_id = secrets.token_hex(KEY_ID_HEX_CHARS // 2)
    secret_key = f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(SECRET_BYTES)}"
    return NewKey(key_id=key_id, secret_key=secret_key, digest=digest_key(secret_key))


def digest_key(secret_key: str) -> bytes:
    """The SHA-256 digest under which a key is stored and looked up."""
    return hashlib.sha256(secret_key.encode("utf-8", "surrogateescape")).digest()


def key_id_of(secret_key: str) -> str | None:
    """The public id embedded in a well-formed key, or None. Safe to log."""
    if not secret_key.startswith(KEY_PREFIX):
        return None
    key_id = secret_key[len(KEY_PREFIX) : len(KEY_PREFIX) + KEY_ID_HEX_CHARS]
    is_hex = len(key_id) == KEY_ID_HEX_CHARS and all(c in "0123456789abcdef" for c in key_id)
    return key_id if is_hex else None


def is_plausible_key(secret_key: str) -> bool:
    """Cheap shape check, so that garbage never costs a database lookup."""
    return 0 < len(secret_key) <= MAX_KEY_LENGTH and key_id_of(secret_key) is not None
