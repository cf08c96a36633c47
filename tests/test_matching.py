"""Tests for secretless_proxy.matching: host normalisation, host/path/workload patterns, canonical paths."""

from __future__ import annotations

import pytest

from secretless_proxy.matching import (
    Glob,
    HostPattern,
    WorkloadPattern,
    canonical_path,
    normalize_host,
    split_spiffe_id,
)


class TestNormalizeHost:
    @pytest.mark.parametrize(
        ("raw", "expected"),
        [
            ("API.Example.COM", "api.example.com"),
            ("api.example.com.", "api.example.com"),
            ("API.EXAMPLE.COM.", "api.example.com"),
            ("bücher.example", "xn--bcher-kva.example"),
            ("BÜCHER.example", "xn--bcher-kva.example"),
            ("xn--bcher-kva.example", "xn--bcher-kva.example"),
            ("[::1]", "::1"),
            ("[2001:DB8:0:0::1]", "2001:db8::1"),
            ("2001:db8:0:0::1", "2001:db8::1"),
            ("10.0.0.1", "10.0.0.1"),
        ],
    )
    def test_canonical_form(self, raw: str, expected: str) -> None:
        """Case, a trailing dot, unicode (→ punycode) and IPv6 brackets/zeros are normalised away."""
        assert normalize_host(raw) == expected

    def test_unicode_and_punycode_spellings_are_equal(self) -> None:
        """A unicode name and its punycode spelling normalise to the same host."""
        assert normalize_host("Bücher.Example.") == normalize_host("xn--bcher-kva.example")

    @pytest.mark.parametrize("raw", ["", ".", "[]"])
    def test_empty_is_refused(self, raw: str) -> None:
        """An empty name (also after removing brackets or the trailing dot) is refused."""
        with pytest.raises(ValueError, match="empty host name"):
            normalize_host(raw)

    @pytest.mark.parametrize(
        "raw",
        [
            "a..example.com",
            "example.com..",
            "-api.example.com",
            "api-.example.com",
            "api_x.example.com",
            "api example.com",
            "api.example.com/v1",
            "api.example.com:443",
            "[::1]:443",
            "*.example.com",
            "a" * 64 + ".example.com",
            ".".join(["a" * 63] * 4) + ".com",  # > 253 characters
            "api.example.com\x00",
        ],
    )
    def test_invalid_names_raise(self, raw: str) -> None:
        """Anything that is not a DNS name or an IP literal raises ValueError naming the input."""
        with pytest.raises(ValueError, match="invalid host name"):
            normalize_host(raw)


class TestHostPattern:
    def test_exact_is_normalised(self) -> None:
        """An exact pattern stores the normalised host and no suffix."""
        pat = HostPattern.parse("API.Example.COM.")
        assert (pat.exact, pat.suffix) == ("api.example.com", None)

    def test_exact_matches_only_that_host(self) -> None:
        """An exact pattern matches its host and nothing around it."""
        pat = HostPattern.parse("api.example.com")
        assert pat.matches("api.example.com")
        assert not pat.matches("a.api.example.com")
        assert not pat.matches("example.com")
        assert not pat.matches("api.example.com.evil.test")

    def test_exact_ipv6_in_brackets(self) -> None:
        """A bracketed IPv6 literal is accepted and matched in its canonical form."""
        pat = HostPattern.parse("[2001:db8::0:1]")
        assert pat.matches(normalize_host("[2001:DB8::1]"))

    @pytest.mark.parametrize(
        "host", ["a.example.com", "a.b.example.com", "xn--bcher-kva.example.com"]
    )
    def test_wildcard_matches_subdomains(self, host: str) -> None:
        """'*.example.com' matches one or more labels in front of example.com."""
        assert HostPattern.parse("*.example.com").matches(host)

    @pytest.mark.parametrize(
        "host",
        ["example.com", "evilexample.com", "example.com.evil.test", "a.example.co", ".example.com"],
    )
    def test_wildcard_stops_at_label_boundary(self, host: str) -> None:
        """A wildcard never matches the bare base name, a name merely ending in it, or a longer suffix."""
        assert not HostPattern.parse("*.example.com").matches(host)

    def test_wildcard_base_is_normalised(self) -> None:
        """The part after '*.' is normalised like an exact host (case, trailing dot, IDNA)."""
        pat = HostPattern.parse("*.Bücher.Example.")
        assert pat.suffix == ".xn--bcher-kva.example"
        assert pat.matches(normalize_host("shop.BÜCHER.example"))

    @pytest.mark.parametrize(
        "text", ["api.*.com", "*example.com", "*", "api.example.*", "a*.example.com"]
    )
    def test_unanchored_wildcard_refused(self, text: str) -> None:
        """A '*' anywhere but as the whole leading label is refused."""
        with pytest.raises(ValueError, match=r"unanchored host pattern .*as in \*\.example\.com"):
            HostPattern.parse(text)

    def test_second_wildcard_refused(self) -> None:
        """Only one leading '*.' is allowed."""
        with pytest.raises(ValueError, match=r"only one leading '\*\.' wildcard"):
            HostPattern.parse("*.*.example.com")

    @pytest.mark.parametrize("text", ["*.com", "*.localhost", "*.com."])
    def test_too_broad_wildcard_refused(self, text: str) -> None:
        """A wildcard over a single label (a whole TLD) is refused as too broad."""
        with pytest.raises(ValueError, match="too broad"):
            HostPattern.parse(text)

    @pytest.mark.parametrize(
        "text",
        [
            "https://api.example.com",
            "api.example.com:443",
            "api.example.com/v1",
            "user@api.example.com",
            "api.example.com?x",
            "api.example.com#x",
        ],
    )
    def test_scheme_port_path_user_refused(self, text: str) -> None:
        """A URL-ish host says what to remove instead of being half-understood."""
        with pytest.raises(
            ValueError, match="give a bare host name, no scheme, port, path or user"
        ):
            HostPattern.parse(text)

    def test_empty_refused(self) -> None:
        """An empty host is refused."""
        with pytest.raises(ValueError, match="non-empty string"):
            HostPattern.parse("")


class TestGlob:
    @pytest.mark.parametrize(
        ("pattern", "value", "expected"),
        [
            ("/v1/charges/*", "/v1/charges/ch_1", True),
            ("/v1/charges/*", "/v1/charges/ch_1/refunds", False),
            ("/v1/charges/*", "/v1/charges", False),
            ("/v1/*/refunds", "/v1/ch_1/refunds", True),
            ("/v1/*/refunds", "/v1/a/b/refunds", False),
            ("/files/*.json", "/files/a.json", True),
            ("/files/*.json", "/files/a/b.json", False),
            ("/files/*.json", "/files/a.jsonx", False),
            ("/v1/**", "/v1/", True),
            ("/v1/**", "/v1/a", True),
            ("/v1/**", "/v1/a/b/c", True),
            ("/v1/**", "/v1", False),
            ("/v1/**", "/v2/a", False),
            ("/v1/**/refunds", "/v1/a/refunds", True),
            ("/v1/**/refunds", "/v1/a/b/c/refunds", True),
            ("/v1/**/refunds", "/v1/a/b", False),
        ],
    )
    def test_star_within_segment_double_star_across(
        self, pattern: str, value: str, expected: bool
    ) -> None:
        """'*' never crosses a '/', '**' spans any number of whole segments."""
        assert Glob.parse(pattern).matches(value) is expected

    def test_literal_matches_only_itself(self) -> None:
        """A pattern without '*' is compared literally: no prefix match, regex characters are plain."""
        assert Glob.parse("/v1/a+b(c)").matches("/v1/a+b(c)")
        assert not Glob.parse("/v1/a+b(c)").matches("/v1/aab(c)")
        assert not Glob.parse("/v1/x").matches("/v1/x/y")

    def test_regex_characters_are_escaped_next_to_wildcards(self) -> None:
        """The '.' in '/v1/*.json' is a dot, not 'any character'."""
        assert not Glob.parse("/v1/*.json").matches("/v1/aXjson")

    def test_double_star_inside_segment_refused(self) -> None:
        """'**' glued to other characters is refused rather than read as '*'."""
        with pytest.raises(ValueError, match=r"'\*\*' must be a whole segment in '/v1/a\*\*'"):
            Glob.parse("/v1/a**")


class TestWorkloadPattern:
    def test_parse_splits_trust_domain_and_path(self) -> None:
        """The trust domain and the path glob are held apart."""
        pat = WorkloadPattern.parse("spiffe://example.org/ns/prod/sa/billing")
        assert pat.trust_domain == "example.org"
        assert pat.path.text == "/ns/prod/sa/billing"

    @pytest.mark.parametrize(
        ("pattern", "td", "path", "expected"),
        [
            ("spiffe://example.org/ns/prod/sa/billing", "example.org", "/ns/prod/sa/billing", True),
            (
                "spiffe://example.org/ns/prod/sa/billing",
                "example.org",
                "/ns/prod/sa/billing2",
                False,
            ),
            ("spiffe://example.org/ns/prod/sa/billing", "other.org", "/ns/prod/sa/billing", False),
            ("spiffe://example.org/ns/*/sa/billing", "example.org", "/ns/dev/sa/billing", True),
            ("spiffe://example.org/ns/*/sa/billing", "example.org", "/ns/a/b/sa/billing", False),
            ("spiffe://example.org/ns/*/sa/billing", "example.org", "/ns/dev/sa/other", False),
            ("spiffe://example.org/**", "example.org", "/any/depth/at/all", True),
            ("spiffe://example.org/**", "evil.org", "/any", False),
        ],
    )
    def test_matches(self, pattern: str, td: str, path: str, expected: bool) -> None:
        """A workload matches only in the pattern's trust domain and when the path glob matches."""
        assert WorkloadPattern.parse(pattern).matches(td, path) is expected

    @pytest.mark.parametrize(
        ("text", "why"),
        [
            ("https://example.org/a", "the scheme must be 'spiffe'"),
            ("spiffe://Example.org/a", "the trust domain must be lowercase"),
            ("spiffe:///a", "the trust domain is empty"),
            ("spiffe://example.org/a?x=1", "a query is not allowed"),
            ("example.org/a", "it must start with 'spiffe://'"),
            ("spiffe://example.org/ns/../prod", "segment '..' is not allowed"),
            ("spiffe://example.org/ns/", "empty segment"),
            ("spiffe://example.org/ns/%2e%2e", "percent-encoding is not allowed"),
            ("spiffe://example.org/ns/a**", "'\\*\\*' must be a whole path segment"),
        ],
    )
    def test_not_a_spiffe_id_refused(self, text: str, why: str) -> None:
        """A pattern follows the SPIFFE ID rules: each violation is refused with its reason."""
        with pytest.raises(ValueError, match=r"invalid SPIFFE ID .*" + why):
            WorkloadPattern.parse(text)

    def test_missing_path_suggests_double_star(self) -> None:
        """A bare trust domain is refused and the message suggests the '/**' spelling."""
        with pytest.raises(
            ValueError, match=r"has no path: use spiffe://example\.org/\*\* for every"
        ):
            WorkloadPattern.parse("spiffe://example.org")

    def test_non_string_refused(self) -> None:
        """A non-string pattern (e.g. a YAML number) is refused."""
        with pytest.raises(ValueError, match="must be a string"):
            WorkloadPattern.parse(42)  # type: ignore[arg-type]

    def test_split_spiffe_id(self) -> None:
        """split_spiffe_id returns (trust domain, path) and refuses a bare trust domain (no workload)."""
        assert split_spiffe_id("spiffe://example.org/ns/a") == ("example.org", "/ns/a")
        with pytest.raises(ValueError, match="needs a path after the trust domain"):
            split_spiffe_id("spiffe://example.org")


class TestCanonicalPath:
    @pytest.mark.parametrize(
        ("raw", "expected"),
        [
            ("/", "/"),
            ("/v1/charges/ch_1", "/v1/charges/ch_1"),
            ("/v1/charges?limit=10&next=../x", "/v1/charges"),
            ("/v1/a%20b", "/v1/a b"),
            ("/v1/%41BC", "/v1/ABC"),
            ("/v1/.well-known/jwks", "/v1/.well-known/jwks"),
            ("/v1/...", "/v1/..."),
            ("/v1/..x", "/v1/..x"),
        ],
    )
    def test_normal_paths_kept(self, raw: str, expected: str) -> None:
        """Ordinary paths come back percent-decoded, without the query."""
        assert canonical_path(raw) == expected

    @pytest.mark.parametrize(
        "raw",
        [
            "/v1/../admin",
            "/v1/./admin",
            "/..",
            "/v1/..",
            "/v1/%2e%2e/admin",
            "/v1/%2E%2E/admin",
            "/v1/.%2e/admin",
            "/v1/..%2fadmin",
            "/v1/..%2Fadmin",
            "/v1/%2e%2e%2fadmin",
            "/v1/public/..;/admin",
            "/v1/public/..%3b/admin",
        ],
    )
    def test_dot_segments_refused(self, raw: str) -> None:
        """'..' and '.' segments are refused, also percent-encoded, behind an encoded slash or before ';'."""
        assert canonical_path(raw) is None

    @pytest.mark.parametrize("raw", ["/v1/charges/%EF%BC%8E%EF%BC%8E/admin", "/v1/%EF%BC%8E", "/v1/a%EF%BC%8Fb",
                                     "/v1/a%EF%BC%BCb", "/v1/%252e%252e/admin", "/v1/%252fadmin", "/v1/%255c",
                                     "/v1/%u002e%u002e/admin", "/v1/%U2215admin"])
    def test_what_another_decoder_turns_into_traversal_is_refused(self, raw: str) -> None:
        """Fullwidth dots/slashes (NFKC) and a second encoding of '.', '/', '\\' are refused (hostile review 26)."""
        assert canonical_path(raw) is None

    @pytest.mark.parametrize(("raw", "expected"), [("/v1/caf%C3%A9", "/v1/café"), ("/v1/100%25", "/v1/100%"),
                                                   ("/v1/%E2%82%AC", "/v1/€")])
    def test_other_unicode_and_a_literal_percent_pass(self, raw: str, expected: str) -> None:
        """Non-ASCII that folds to no separator, and %25 for a literal '%', are matched as decoded."""
        assert canonical_path(raw) == expected

    @pytest.mark.parametrize("raw", ["/v1/charges#../../admin", "/v1/charges/x#/../../../admin", "/v1/x?a=1#b", "/v1/x#"])
    def test_fragment_refused(self, raw: str) -> None:
        """A '#' in a request target is refused: the dot segments after it would go unjudged (hostile review 17)."""
        assert canonical_path(raw) is None

    @pytest.mark.parametrize("raw", ["/v1\\..\\admin", "/v1/a\\b", "/v1/a%5cb", "/v1/a%5Cb"])
    def test_backslash_refused(self, raw: str) -> None:
        """A backslash, literal or encoded, is refused: some servers treat it as '/'."""
        assert canonical_path(raw) is None

    @pytest.mark.parametrize(
        "raw", ["/v1/a%00b", "/v1/a\x01b", "/v1/a%0d%0aX-Injected:1", "/v1/a%09", "/v1/a%7f"]
    )
    def test_control_characters_refused(self, raw: str) -> None:
        """NUL, CR/LF, TAB and DEL (literal or encoded) are refused."""
        assert canonical_path(raw) is None

    @pytest.mark.parametrize("raw", ["", "*", "v1/charges", "http://api.example.com/v1"])
    def test_non_origin_form_refused(self, raw: str) -> None:
        """A path that does not start with '/' cannot be matched and is refused."""
        assert canonical_path(raw) is None

    def test_invalid_utf8_refused(self) -> None:
        """Percent-escapes that are not UTF-8 are refused rather than replaced."""
        assert canonical_path("/v1/%ff") is None


class TestHardening:
    @pytest.mark.parametrize("host", ["127.1", "010.0.0.1", "0x7f.1", "a.123"])
    def test_shorthand_ip_names_refused(self, host):
        """Names a resolver would read as shorthand IPv4 are not DNS names."""
        with pytest.raises(ValueError, match="shorthand IP address"):
            normalize_host(host)

    def test_brackets_only_for_ipv6(self):
        """[a.com] is not a host; [::1] is."""
        with pytest.raises(ValueError, match="brackets are for IPv6"):
            normalize_host("[a.com]")
        assert normalize_host("[::1]") == "::1"

    @pytest.mark.parametrize("path", ["/v1/a%2fb", "/v1/a%2F..%2Fadmin", "/v1/a%5cb"])
    def test_encoded_slashes_refused(self, path):
        """Encoded slashes could be one segment to us and two to the upstream: refused."""
        assert canonical_path(path) is None
