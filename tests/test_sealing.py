"""AES-GCM envelopes (secretless_proxy/store/sealing.py): what Redis holds instead of a credential."""

from __future__ import annotations

import base64
import os

import pytest

from secretless_proxy.secretrefs import SecretRef
from secretless_proxy.store.sealing import NONCE_BYTES, Sealer, SealingError, generate_key, parse_key

K1, K2 = os.urandom(32), os.urandom(32)
AAD = "secretless:cred:stripe/abc"


class TestSealer:
    def test_round_trip(self) -> None:
        """What is sealed opens to the same bytes under the same aad."""
        s = Sealer({"k1": K1}, "k1")
        blob = s.seal(b"sk_live_value", aad=AAD)
        assert s.open(blob, aad=AAD) == b"sk_live_value"

    def test_blob_is_not_plaintext(self) -> None:
        """The plaintext does not appear in the blob; the layout is version, key id, nonce, ciphertext."""
        s = Sealer({"k1": K1}, "k1")
        blob = s.seal(b"sk_live_value", aad=AAD)
        assert b"sk_live_value" not in blob
        assert blob[:4] == b"\x01\x02k1"
        assert len(blob) == 4 + NONCE_BYTES + len(b"sk_live_value") + 16

    def test_nonces_differ(self) -> None:
        """Sealing the same value twice gives different blobs (a random nonce each time)."""
        s = Sealer({"k1": K1}, "k1")
        assert s.seal(b"v", aad=AAD) != s.seal(b"v", aad=AAD)

    def test_wrong_aad(self) -> None:
        """A blob moved to another store key does not open."""
        s = Sealer({"k1": K1}, "k1")
        blob = s.seal(b"v", aad=AAD)
        with pytest.raises(SealingError, match="does not authenticate with key 'k1'"):
            s.open(blob, aad="secretless:cred:github/abc")

    def test_tamper(self) -> None:
        """Any flipped ciphertext bit makes the blob refuse to open."""
        s = Sealer({"k1": K1}, "k1")
        blob = bytearray(s.seal(b"value", aad=AAD))
        blob[-1] ^= 1
        with pytest.raises(SealingError, match="altered"):
            s.open(bytes(blob), aad=AAD)

    def test_edited_key_id(self) -> None:
        """Relabelling a blob with another known key id does not open it either."""
        s = Sealer({"k1": K1, "k2": K2}, "k1")
        blob = s.seal(b"value", aad=AAD).replace(b"k1", b"k2", 1)
        with pytest.raises(SealingError, match="does not authenticate with key 'k2'"):
            s.open(blob, aad=AAD)

    def test_unknown_key_id(self) -> None:
        """A blob sealed with a key this proxy does not hold is refused, naming the key id."""
        blob = Sealer({"k9": K1}, "k9").seal(b"value", aad=AAD)
        with pytest.raises(SealingError, match=r"sealed with key 'k9', which this proxy does not hold \(known: k1\)"):
            Sealer({"k1": K1}, "k1").open(blob, aad=AAD)

    @pytest.mark.parametrize("blob", [b"", b"\x01", b"\x02\x02k1" + bytes(40), b"\x01\x02k1short"])
    def test_malformed(self, blob: bytes) -> None:
        """Truncated data and unknown versions are refused, never guessed at."""
        with pytest.raises(SealingError, match="too short|unknown sealed-data version"):
            Sealer({"k1": K1}, "k1").open(blob, aad=AAD)

    def test_rotation(self) -> None:
        """Old blobs open with the old key while new seals use the active key."""
        old = Sealer({"k1": K1}, "k1")
        old_blob = old.seal(b"before", aad=AAD)
        rotated = Sealer({"k1": K1, "k2": K2}, "k2")
        assert rotated.open(old_blob, aad=AAD) == b"before"
        new_blob = rotated.seal(b"after", aad=AAD)
        assert rotated.key_id_of(new_blob) == "k2"
        assert rotated.key_id_of(old_blob) == "k1"
        with pytest.raises(SealingError, match="key 'k2'"):
            old.open(new_blob, aad=AAD)

    def test_repr_hides_keys(self) -> None:
        """The repr names key ids only."""
        s = Sealer({"k1": K1}, "k1")
        assert repr(s) == "Sealer(keys=['k1'], active='k1')"
        assert K1.hex() not in repr(s)

    @pytest.mark.parametrize(("keys", "active", "message"), [
        ({}, "k1", "at least one encryption key"),
        ({"k1": b"short"}, "k1", "must be 32 bytes"),
        ({"bad id": K1}, "bad id", "invalid key id"),
        ({"k1": K1}, "k2", r"active key 'k2' is not one of the keys \(k1\)"),
    ])
    def test_invalid_keys(self, keys: dict, active: str, message: str) -> None:
        """Wrong key sizes, ids or active key are refused at construction."""
        with pytest.raises(ValueError, match=message):
            Sealer(keys, active)


class TestKeyText:
    @pytest.mark.parametrize("encode", [
        bytes.hex,
        lambda b: base64.b64encode(b).decode(),
        lambda b: base64.urlsafe_b64encode(b).decode().rstrip("="),
        lambda b: "  " + b.hex().upper() + "\n",
    ])
    def test_forms(self, encode) -> None:
        """Hex (any case) and base64 (standard, url-safe, unpadded) all read to the same key."""
        assert parse_key(encode(K1)) == K1

    # ids name the random keys: every xdist worker collects the same test ids
    @pytest.mark.parametrize("text", ["", "abc", os.urandom(16).hex(), base64.b64encode(os.urandom(31)).decode(),
                                      "not base64 at all!"],
                             ids=["empty", "abc", "hex-16-bytes", "base64-31-bytes", "not-base64"])
    def test_wrong_sizes(self, text: str) -> None:
        """Anything that is not 32 bytes is refused with the way to make a key."""
        with pytest.raises(ValueError, match="must be 32 random bytes .*token_hex"):
            parse_key(text)

    def test_generate(self) -> None:
        """A generated key reads back as 32 bytes."""
        assert len(parse_key(generate_key())) == 32

    def test_from_refs(self, tmp_path, monkeypatch) -> None:
        """Keys resolve from env: and file: references."""
        monkeypatch.setenv("STORE_KEY_K1", K1.hex())
        (tmp_path / "k2").write_text(base64.b64encode(K2).decode() + "\n")
        s = Sealer.from_refs({"k1": SecretRef.parse("env:STORE_KEY_K1"),
                              "k2": SecretRef.parse(f"file:{tmp_path / 'k2'}")}, "k2")
        assert s.key_ids == {"k1", "k2"} and s.active_key_id == "k2"
        assert Sealer({"k2": K2}, "k2").open(s.seal(b"x", aad=AAD), aad=AAD) == b"x"
        assert s.open(Sealer({"k1": K1}, "k1").seal(b"y", aad=AAD), aad=AAD) == b"y"

    def test_from_refs_errors(self, monkeypatch) -> None:
        """An unset or malformed key names the key id and the reference, never the value."""
        monkeypatch.delenv("STORE_KEY_MISSING", raising=False)
        with pytest.raises(ValueError, match="encryption key 'k1': cannot resolve env:STORE_KEY_MISSING"):
            Sealer.from_refs({"k1": SecretRef.parse("env:STORE_KEY_MISSING")}, "k1")
        monkeypatch.setenv("STORE_KEY_BAD", "hunter2")
        with pytest.raises(ValueError, match=r"encryption key 'k1' \(env:STORE_KEY_BAD\): an encryption key must") as exc:
            Sealer.from_refs({"k1": SecretRef.parse("env:STORE_KEY_BAD")}, "k1")
        assert "hunter2" not in str(exc.value)
