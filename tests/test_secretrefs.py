"""Tests for secretless_proxy.secretrefs: masked Secret values and env:/file: references."""

from __future__ import annotations

import copy
import logging
import os
import pickle
import re
from pathlib import Path

import pytest

from secretless_proxy.errors import SecretUnavailable
from secretless_proxy.secretrefs import Secret, SecretRef

VALUE = "sk_live_51Hc0ffee"
MASK = "Secret('****')"


class TestSecret:
    def test_reveal_returns_value(self) -> None:
        """reveal() is the one way to get the value back."""
        assert Secret(VALUE).reveal() == VALUE

    @pytest.mark.parametrize(
        "render",
        [
            repr,
            str,
            lambda s: f"{s}",
            lambda s: f"{s!r}",
            lambda s: f"{s!s}",
            lambda s: f"{s:>40}",
            lambda s: f"{s:s}",
            lambda s: "{}".format(s),  # noqa: UP032 - str.format is the path under test
            lambda s: "%s" % s,  # noqa: UP031 - %-formatting is the path under test
            lambda s: "%r" % s,  # noqa: UP031 - %-formatting is the path under test
            format,
        ],
        ids=[
            "repr",
            "str",
            "fstring",
            "fstring-r",
            "fstring-s",
            "fstring-spec",
            "fstring-s-spec",
            "str.format",
            "percent-s",
            "percent-r",
            "format",
        ],
    )
    def test_text_forms_are_masked(self, render) -> None:
        """Every way of turning a Secret into text gives the mask, never the value."""
        assert render(Secret(VALUE)) == MASK

    def test_masked_inside_containers_and_self_documenting_fstring(self) -> None:
        """Containers and f'{x=}' use repr, so the value does not leak through them either."""
        s = Secret(VALUE)
        assert VALUE not in repr([s]) + repr({"k": s}) + f"{s=}"
        assert MASK in repr({"k": s})

    def test_masked_in_log_record(self, caplog: pytest.LogCaptureFixture) -> None:
        """A Secret passed to a logger by mistake is logged as the mask."""
        with caplog.at_level(logging.INFO):
            logging.getLogger("test").info("token=%s", Secret(VALUE))
        assert caplog.records[0].getMessage() == f"token={MASK}"

    def test_pickle_refused(self) -> None:
        """A Secret cannot be pickled (saved flows, caches, multiprocessing would carry the value)."""
        with pytest.raises(TypeError, match="a Secret cannot be pickled"):
            pickle.dumps(Secret(VALUE))

    def test_copy_refused(self) -> None:
        """copy() goes through the same refusal as pickling."""
        with pytest.raises(TypeError, match="a Secret cannot be pickled"):
            copy.copy(Secret(VALUE))

    def test_equality_by_value(self) -> None:
        """Two Secrets with the same value are equal; a Secret never equals its plain string."""
        assert Secret(VALUE) == Secret(VALUE)
        assert Secret(VALUE) != Secret(VALUE + "x")
        assert Secret(VALUE) != VALUE

    def test_no_instance_dict(self) -> None:
        """The value lives in a slot: vars() has nothing to dump."""
        with pytest.raises(TypeError):
            vars(Secret(VALUE))


class TestSecretRefParse:
    def test_env(self) -> None:
        """env:NAME parses to an env reference and prints back the same."""
        ref = SecretRef.parse("env:STRIPE_API_KEY")
        assert (ref.scheme, ref.target, str(ref)) == ("env", "STRIPE_API_KEY", "env:STRIPE_API_KEY")

    def test_file_relative_resolves_against_base_dir(self, tmp_path: Path) -> None:
        """A relative file: path is anchored at base_dir (the config file's directory)."""
        ref = SecretRef.parse("file:secrets/gh.token", base_dir=tmp_path)
        assert ref.target == str(tmp_path / "secrets" / "gh.token")

    def test_file_absolute_ignores_base_dir(self, tmp_path: Path) -> None:
        """An absolute file: path is kept as written."""
        assert SecretRef.parse("file:/run/secrets/x", base_dir=tmp_path).target == "/run/secrets/x"

    @pytest.mark.parametrize("text", ["STRIPE_API_KEY", "vault:kv/x", "env:", "file:", "ENV:X", ""])
    def test_invalid_reference(self, text: str) -> None:
        """Anything but env:NAME or file:PATH is refused with the two accepted forms."""
        with pytest.raises(ValueError, match="use env:NAME or file:/path"):
            SecretRef.parse(text)

    @pytest.mark.parametrize("text", ["env:1ABC", "env:A-B", "env:A B"])
    def test_invalid_env_name(self, text: str) -> None:
        """An environment variable name must be a valid identifier."""
        with pytest.raises(ValueError, match="invalid environment variable name"):
            SecretRef.parse(text)

    def test_repr_holds_no_value(self, tmp_path: Path) -> None:
        """A reference's repr names where the secret is, never the cached value."""
        (tmp_path / "k").write_text(VALUE)
        ref = SecretRef.parse(f"file:{tmp_path / 'k'}")
        ref.resolve()
        assert VALUE not in repr(ref)


class TestEnvSecret:
    def test_resolve(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """env: reads the proxy's environment at resolve time."""
        monkeypatch.setenv("SECRETLESS_TEST_KEY", VALUE)
        secret = SecretRef.parse("env:SECRETLESS_TEST_KEY").resolve()
        assert isinstance(secret, Secret)
        assert secret.reveal() == VALUE

    def test_resolve_sees_rotation(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Each resolve reads the variable again."""
        ref = SecretRef.parse("env:SECRETLESS_TEST_KEY")
        monkeypatch.setenv("SECRETLESS_TEST_KEY", "one")
        assert ref.resolve().reveal() == "one"
        monkeypatch.setenv("SECRETLESS_TEST_KEY", "two")
        assert ref.resolve().reveal() == "two"

    def test_unset_names_the_variable(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """An unset variable raises SecretUnavailable naming the variable."""
        monkeypatch.delenv("SECRETLESS_TEST_UNSET", raising=False)
        with pytest.raises(
            SecretUnavailable, match=r"^environment variable SECRETLESS_TEST_UNSET is not set$"
        ):
            SecretRef.parse("env:SECRETLESS_TEST_UNSET").resolve()

    def test_empty_refused(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """A set but empty variable is refused, not sent as an empty credential."""
        monkeypatch.setenv("SECRETLESS_TEST_KEY", "")
        with pytest.raises(SecretUnavailable, match=r"secret env:SECRETLESS_TEST_KEY is empty"):
            SecretRef.parse("env:SECRETLESS_TEST_KEY").resolve()

    @pytest.mark.parametrize("bad", [VALUE + "\r\nX-Evil: 1", VALUE + "\n", "\r" + VALUE])
    def test_line_break_refused_without_value(
        self, monkeypatch: pytest.MonkeyPatch, bad: str
    ) -> None:
        """A value with CR/LF is refused (header injection) and the message does not echo it."""
        monkeypatch.setenv("SECRETLESS_TEST_KEY", bad)
        with pytest.raises(SecretUnavailable, match="contains a line break") as info:
            SecretRef.parse("env:SECRETLESS_TEST_KEY").resolve()
        assert VALUE not in str(info.value)


class TestFileSecret:
    @staticmethod
    def ref_to(path: Path) -> SecretRef:
        return SecretRef.parse(f"file:{path}")

    @pytest.mark.parametrize(
        ("content", "expected"),
        [
            (VALUE, VALUE),
            (VALUE + "\n", VALUE),
            (VALUE + "\r\n", VALUE),
            ("  spaced  \n", "  spaced  "),
        ],
        ids=["no-newline", "lf", "crlf", "spaces-kept"],
    )
    def test_one_trailing_newline_stripped(
        self, tmp_path: Path, content: str, expected: str
    ) -> None:
        """The single line terminator `echo > file` adds is dropped; nothing else is trimmed."""
        path = tmp_path / "key"
        path.write_bytes(content.encode())
        assert self.ref_to(path).resolve().reveal() == expected

    @pytest.mark.parametrize(
        "content",
        [
            VALUE + "\n\n",
            VALUE + "\r\n\r\n",
            "first\nsecond\n",
            "first\r\nsecond",
            VALUE + "\r",
            "a\x00b",
        ],
        ids=["two-lf", "two-crlf", "two-lines", "crlf-inside", "bare-cr", "nul"],
    )
    def test_line_breaks_beyond_the_last_refused(self, tmp_path: Path, content: str) -> None:
        """Any CR/LF (or NUL) other than one final newline makes the secret refused, not trimmed."""
        path = tmp_path / "key"
        path.write_bytes(content.encode())
        with pytest.raises(
            SecretUnavailable,
            match=rf"secret file:{re.escape(str(path))} contains a line break or NUL byte",
        ):
            self.ref_to(path).resolve()

    @pytest.mark.parametrize("content", ["", "\n", "\r\n"])
    def test_empty_refused(self, tmp_path: Path, content: str) -> None:
        """An empty file (or one holding only a newline) is refused."""
        path = tmp_path / "key"
        path.write_bytes(content.encode())
        with pytest.raises(
            SecretUnavailable, match=rf"secret file:{re.escape(str(path))} is empty"
        ):
            self.ref_to(path).resolve()

    def test_rewritten_file_is_reread(self, tmp_path: Path) -> None:
        """Rewriting the file in place (new size) is picked up by the next resolve."""
        path = tmp_path / "key"
        path.write_text("first-secret\n")
        ref = self.ref_to(path)
        assert ref.resolve().reveal() == "first-secret"
        path.write_text("second-secret-rotated\n")
        assert ref.resolve().reveal() == "second-secret-rotated"

    def test_atomically_replaced_file_is_reread(self, tmp_path: Path) -> None:
        """A same-length secret swapped in by rename (as Kubernetes volumes do) is picked up."""
        path = tmp_path / "key"
        path.write_text("secret-AAAA\n")
        ref = self.ref_to(path)
        assert ref.resolve().reveal() == "secret-AAAA"
        staged = tmp_path / "key.new"
        staged.write_text("secret-BBBB\n")
        os.replace(staged, path)
        assert ref.resolve().reveal() == "secret-BBBB"

    def test_rotation_to_invalid_content_fails_closed(self, tmp_path: Path) -> None:
        """A previously good file that turns empty raises instead of serving the old value."""
        path = tmp_path / "key"
        path.write_text("good-secret\n")
        ref = self.ref_to(path)
        ref.resolve()
        path.write_text("")
        with pytest.raises(SecretUnavailable, match="is empty"):
            ref.resolve()

    def test_deleted_file_raises(self, tmp_path: Path) -> None:
        """After a successful read, deleting the file fails closed instead of using the cached value."""
        path = tmp_path / "key"
        path.write_text(VALUE)
        ref = self.ref_to(path)
        assert ref.resolve().reveal() == VALUE
        path.unlink()
        with pytest.raises(
            SecretUnavailable, match=rf"^secret file {re.escape(str(path))} does not exist$"
        ):
            ref.resolve()

    def test_missing_file_raises(self) -> None:
        """A reference to a file that never existed raises SecretUnavailable naming the path."""
        with pytest.raises(
            SecretUnavailable, match="secret file /nonexistent/secretless/key does not exist"
        ):
            SecretRef.parse("file:/nonexistent/secretless/key").resolve()

    def test_directory_is_unreadable(self, tmp_path: Path) -> None:
        """A path that is a directory raises SecretUnavailable, not a raw OSError."""
        with pytest.raises(SecretUnavailable, match=r"is not a regular file \(a directory\)"):
            self.ref_to(tmp_path).resolve()

    def test_non_utf8_is_unreadable(self, tmp_path: Path) -> None:
        """Bytes that are not UTF-8 raise SecretUnavailable and the message does not echo them."""
        path = tmp_path / "key"
        path.write_bytes(b"\xffsecret")
        with pytest.raises(
            SecretUnavailable,
            match=rf"^secret file {re.escape(str(path))} cannot be read \(UnicodeDecodeError\)$",
        ):
            self.ref_to(path).resolve()
