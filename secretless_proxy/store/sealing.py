"""AES-GCM envelopes for what the proxy writes to a shared store: Redis never holds a plaintext credential.

Blob layout (all fields in this order)::

    version (1 byte, 0x01) | key id length (1 byte) | key id (ASCII) | nonce (12 bytes) | ciphertext + 16-byte tag

The header (version and key id) and the caller's ``aad`` (the Redis key the blob is stored
under) are authenticated: a blob copied to another key, or with its key id edited, does not
open. Nonces are random (96 bits); NIST SP 800-38D §8.3 bounds one key to 2**32 random-nonce
encryptions, far beyond a credential cache's traffic between rotations.

Rotation: a ``Sealer`` holds several keys and seals with the active one; a blob opens with the
key whose id it records. Roll out a new key in three steps: add it everywhere (not active),
make it active, and drop the old key once every blob sealed with it has expired (the longest
credential lifetime; tombstones carry no sealed data).
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import secrets
from collections.abc import Mapping

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from secretless_proxy.errors import SecretlessError, SecretUnavailable
from secretless_proxy.secretrefs import SecretRef

VERSION = 1
KEY_BYTES = 32  # AES-256
NONCE_BYTES = 12
_KEY_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}\Z")
_HEX = re.compile(r"[0-9a-fA-F]{64}\Z")


class SealingError(SecretlessError):
    """A blob does not open: unknown key id, wrong store key (aad), tampered or malformed."""


def parse_key(text: str) -> bytes:
    """A 32-byte key from its text form: 64 hex digits, or base64 (standard or url-safe)."""
    text = text.strip()
    if _HEX.match(text):
        return bytes.fromhex(text)
    try:
        raw = base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_" if ("-" in text or "_" in text) else None,
                               validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != KEY_BYTES:
        raise ValueError(
            "an encryption key must be 32 random bytes written as 64 hex digits or base64 "
            "(make one with: python -c 'import secrets; print(secrets.token_hex(32))')"
        )
    return raw


def generate_key() -> str:
    """A fresh key in the text form ``parse_key`` reads (hex)."""
    return secrets.token_hex(KEY_BYTES)


class Sealer:
    """Seals with the active key, opens with whichever known key a blob names. ``repr`` shows ids only."""

    __slots__ = ("_aeads", "_active", "_derived", "_keys")

    def __init__(self, keys: Mapping[str, bytes], active: str) -> None:
        if not keys:
            raise ValueError("at least one encryption key is needed")
        for kid, key in keys.items():
            if not isinstance(kid, str) or not _KEY_ID.match(kid):
                raise ValueError(f"invalid key id {kid!r}: 1 to 64 letters, digits, '_', '.' or '-'")
            if not isinstance(key, bytes) or len(key) != KEY_BYTES:
                raise ValueError(f"encryption key {kid!r} must be {KEY_BYTES} bytes")
        if active not in keys:
            raise ValueError(f"active key {active!r} is not one of the keys ({', '.join(sorted(keys))})")
        self._aeads = {kid: AESGCM(key) for kid, key in keys.items()}
        self._keys = dict(keys)
        self._derived: dict[tuple[str, str], bytes] = {}
        self._active = active

    @classmethod
    def from_refs(cls, refs: Mapping[str, SecretRef], active: str) -> Sealer:
        """Resolve each key from its secret reference (``env:``/``file:``); errors name the reference."""
        keys = {}
        for kid, ref in refs.items():
            try:
                keys[kid] = parse_key(ref.resolve().reveal())
            except SecretUnavailable as exc:
                raise ValueError(f"encryption key {kid!r}: cannot resolve {ref}: {exc}") from None
            except ValueError as exc:
                raise ValueError(f"encryption key {kid!r} ({ref}): {exc}") from None
        return cls(keys, active)

    def __repr__(self) -> str:
        return f"Sealer(keys={sorted(self._aeads)!r}, active={self._active!r})"

    @property
    def active_key_id(self) -> str:
        return self._active

    @property
    def key_ids(self) -> frozenset[str]:
        return frozenset(self._aeads)

    def seal(self, plaintext: bytes, *, aad: bytes | str) -> bytes:
        kid = self._active.encode("ascii")
        header = bytes((VERSION, len(kid))) + kid
        nonce = os.urandom(NONCE_BYTES)
        return header + nonce + self._aeads[self._active].encrypt(nonce, plaintext, header + _bytes(aad))

    def open(self, blob: bytes, *, aad: bytes | str) -> bytes:
        kid, header, body = _split(blob)
        aead = self._aeads.get(kid)
        if aead is None:
            raise SealingError(f"the blob was sealed with key {kid!r}, which this proxy does not hold "
                               f"(known: {', '.join(sorted(self._aeads))})")
        try:
            return aead.decrypt(body[:NONCE_BYTES], body[NONCE_BYTES:], header + _bytes(aad))
        except InvalidTag:
            raise SealingError(f"the blob does not authenticate with key {kid!r}: it was altered "
                               "or belongs to another store key") from None

    def derive(self, purpose: str, kid: str | None = None) -> bytes:
        """A 32-byte subkey of key ``kid`` (default: the active one) for ``purpose`` (HKDF-SHA256, RFC 5869).

        Event signatures and key-name digests use subkeys, never the sealing key itself, so one
        purpose's outputs say nothing about another's. KeyError if ``kid`` is unknown.
        """
        kid = self._active if kid is None else kid
        derived = self._derived.get((kid, purpose))
        if derived is None:
            hkdf = HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=b"secretless-proxy store v1",
                        info=purpose.encode())
            derived = self._derived[(kid, purpose)] = hkdf.derive(self._keys[kid])
        return derived

    def key_id_of(self, blob: bytes) -> str:
        """The id of the key a blob was sealed with (to find blobs still under an old key)."""
        return _split(blob)[0]


def _split(blob: bytes) -> tuple[str, bytes, bytes]:
    if not isinstance(blob, bytes | bytearray) or len(blob) < 2:
        raise SealingError("the blob is too short to be sealed data")
    if blob[0] != VERSION:
        raise SealingError(f"unknown sealed-data version {blob[0]}")
    end = 2 + blob[1]
    if len(blob) < end + NONCE_BYTES + 16:
        raise SealingError("the blob is too short to be sealed data")
    try:
        kid = bytes(blob[2:end]).decode("ascii")
    except UnicodeDecodeError:
        raise SealingError("the blob's key id is not ASCII") from None
    return kid, bytes(blob[:end]), bytes(blob[end:])


def _bytes(aad: bytes | str) -> bytes:
    return aad.encode("utf-8") if isinstance(aad, str) else aad
