"""Store URLs for Redis: which server (or Sentinel service), database, user and whether TLS.

URLs (a password never goes in the URL: it is a secret, pass it as ``password``):

    redis://[user@]host:6379/0                               plain TCP (loopback or a private network)
    rediss://[user@]host:6380/0                              TLS (``tls`` gives CA bundle, client cert)
    redis+sentinel://[user@]h1:26379,h2:26379/mymaster/0     Sentinel: discovers the master of "mymaster"
    rediss+sentinel://...                                    the same over TLS (sentinels and master)

``parse_url`` is the one grammar: the config parser (``storeconfig.py``) uses it to refuse a bad
URL at ``check`` time, and ``RedisStore`` to connect.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

SCHEMES = ("redis", "rediss", "redis+sentinel", "rediss+sentinel")


@dataclass(frozen=True, kw_only=True)
class RedisTarget:
    """A parsed store URL."""

    scheme: str
    tls: bool
    sentinels: tuple[tuple[str, int], ...] = ()  # Sentinel only
    service: str | None = None  # Sentinel only: the monitored master's name
    db: int = 0
    username: str | None = None


def parse_url(url: str) -> RedisTarget:
    """Check a store URL (see the module docstring); ValueError names what is wrong."""
    try:
        parts = urlsplit(url)
        scheme = parts.scheme
    except ValueError:
        raise ValueError(f"invalid store URL {url!r}") from None
    if scheme not in SCHEMES:
        raise ValueError(f"unsupported store URL scheme {scheme!r} (use memory://, {', '.join(s + '://' for s in SCHEMES)})")
    userinfo, _, hosts = parts.netloc.rpartition("@")
    if ":" in userinfo:
        raise ValueError("the store URL must not contain a password: give it as store.password "
                         "(a secret reference such as env:REDIS_PASSWORD)")
    if parts.query or parts.fragment:
        raise ValueError("the store URL takes no query or fragment; use the store settings instead")
    username = unquote(userinfo) or None
    segments = [s for s in parts.path.split("/") if s]
    if not scheme.endswith("+sentinel"):
        if not parts.hostname:
            raise ValueError(f"the store URL {url!r} names no host")
        try:
            parts.port  # noqa: B018 - validates the port
        except ValueError:
            raise ValueError(f"invalid port in store URL {url!r}") from None
        return RedisTarget(scheme=scheme, tls=scheme == "rediss", db=_db(segments[:1], url), username=username)
    sentinels = []
    for item in hosts.split(","):
        host, sep, port = item.rpartition(":") if item.rsplit(":", 1)[-1].isdigit() else (item, "", "")
        host = host.strip("[]")
        if not host or (sep and not 0 < int(port) < 65536):
            raise ValueError(f"invalid sentinel address {item!r} in store URL {url!r} (use host:port)")
        sentinels.append((host, int(port) if sep else 26379))
    if not segments or len(segments) > 2:
        raise ValueError(f"a Sentinel store URL names the master: redis+sentinel://host:26379/<service>[/<db>], got {url!r}")
    return RedisTarget(scheme=scheme, tls=scheme.startswith("rediss"), sentinels=tuple(sentinels),
                       service=unquote(segments[0]), db=_db(segments[1:], url), username=username)


def _db(segments: list[str], url: str) -> int:
    if not segments:
        return 0
    if not segments[0].isdigit():
        raise ValueError(f"invalid database number {segments[0]!r} in store URL {url!r}")
    return int(segments[0])
