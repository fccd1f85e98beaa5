"""Sealing the internal keys of shared backends, so the database never holds them in clear.

A backend on another host has its own bearer key (its LLAMA_API_KEY). The registry in
PostgreSQL keeps it sealed with AES-GCM under LLAMA_PROXY_BACKEND_SECRET, a secret that
lives only in the config of each gateway and admin host. Someone who can read the
database, a dump or a backup, but not a gateway's config, learns the backends' URLs and
names but cannot call them. The backend's name and URL are bound in as associated data,
so a sealed key copied onto another row, or left on a row whose URL someone with write
access pointed at a host of their own, does not open: the gateways leave that member out
instead of sending its key and its users' traffic there.
"""

from __future__ import annotations

import base64
import hashlib
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

VERSION = "v1"
NONCE_BYTES = 12
SECRET_KEY = "LLAMA_PROXY_BACKEND_SECRET"


class SealingError(Exception):
    """A key cannot be sealed or opened; the message says what to fix."""


def _cipher(secret: str) -> AESGCM:
    if not secret:
        raise SealingError(
            f"{SECRET_KEY} is empty: backends on other hosts need it to keep their keys "
            "sealed in the database; set the same value on every gateway and admin host "
            "(./console.sh start generates one in runtime/config.env)"
        )
    # Any length of secret text becomes one 256-bit key.
    return AESGCM(hashlib.sha256(secret.encode()).digest())


def _bound(name: str, url: str) -> bytes:
    # A newline cannot occur in a checked name or URL, so no two pairs give the same bytes.
    return f"{name}\n{url}".encode()


def seal(secret: str, name: str, url: str, key: str) -> str:
    """The key sealed for the backend `name` at `url`: 'v1:' and base64 of nonce and
    ciphertext."""
    nonce = os.urandom(NONCE_BYTES)
    sealed = _cipher(secret).encrypt(nonce, key.encode(), _bound(name, url))
    return f"{VERSION}:{base64.b64encode(nonce + sealed).decode()}"


def unseal(secret: str, name: str, url: str, sealed: str) -> str:
    """The key sealed by seal() for `name` at `url`; SealingError if the secret or row is
    wrong."""
    version, _, payload = sealed.partition(":")
    if version != VERSION:
        raise SealingError(f"the key of backend {name!r} is not sealed in a known format")
    try:
        raw = base64.b64decode(payload, validate=True)
        opened = _cipher(secret).decrypt(raw[:NONCE_BYTES], raw[NONCE_BYTES:], _bound(name, url))
    except (ValueError, InvalidTag):
        raise SealingError(
            f"cannot open the key of backend {name!r}: this host's {SECRET_KEY} differs "
            "from the one it was added with (copy that value into runtime/config.env), or "
            "its name or URL was changed in the database since (remove-backend and "
            "add-backend it again)"
        ) from None
    return opened.decode()
