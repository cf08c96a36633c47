"""One brokered provider call: per-attempt timeout, retries with backoff, a checked result.

Split from ``broker.py`` (which decides *when* to call): this module is *how* one call goes.
A provider's own exception text may hold a secret, so only its type is logged and our own
sentence is raised. Each credential issued by a revocable provider is stamped (in ``meta``) with
a hash of where it can be revoked, so that a token swept from the store after a restart is
revoked there or not at all (``revokes_where_issued``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import time
from collections.abc import Callable

from secretless_proxy.config.model import BrokerConfig
from secretless_proxy.credentials.base import IssuedCredential, Provider, ProviderError, RequestContext
from secretless_proxy.secretrefs import Secret

log = logging.getLogger("secretless_proxy.broker")  # the broker's story, one logger

REVOKE_AT = "revocation_target"  # meta key: a hash of where the credential can be revoked


async def call(name: str, provider: Provider, ctx: RequestContext, *, config: BrokerConfig,
               attempts: int | None, now: Callable[[], float], rng: Callable[[], float],
               backoff: tuple[float, float], emit: Callable[..., None]) -> IssuedCredential:
    """One credential from the provider: timeout per attempt, ``attempts`` (default 1 + retries) with
    capped full-jitter backoff between them, a checked result stamped with its revocation target."""
    cfg = config
    attempts = attempts or 1 + max(0, cfg.retries)
    for attempt in range(1, attempts + 1):
        began = time.perf_counter()
        outcome = "error"
        try:
            async with asyncio.timeout(cfg.timeout) as deadline:
                result = await provider.fetch(ctx)
            cred = check(name, provider, result, now=now(), skew=cfg.skew)
        except ProviderError as exc:
            error = exc
        except TimeoutError as exc:
            if deadline.expired():
                outcome = "timeout"
                error = ProviderError(f"the {provider.kind} provider for credential '{name}' did not "
                                      f"answer within {cfg.timeout:g} s")
            else:
                error = unexpected(name, provider, exc)
        except Exception as exc:  # noqa: BLE001 - any provider bug is a failed attempt
            error = unexpected(name, provider, exc)
        else:
            emit("fetched", credential=name, kind=provider.kind, outcome="success",
                 seconds=time.perf_counter() - began)
            return _stamp(cred, provider)
        emit("fetched", credential=name, kind=provider.kind, outcome=outcome,
             seconds=time.perf_counter() - began)
        log.warning("credential '%s': attempt %d of %d failed: %s", name, attempt, attempts, error)
        if not error.retryable:
            break
        if attempt < attempts:
            delay = min(backoff[1], backoff[0] * 2 ** (attempt - 1))
            await asyncio.sleep(delay * rng())
    raise ProviderError(f"credential '{name}' is unavailable after {attempt} attempt(s): {error}",
                        retryable=error.retryable)


def check(name: str, provider: Provider, result: object, *, now: float, skew: float) -> IssuedCredential:
    """Reject what is not a usable credential; a malformed answer is a failure, not a token."""
    what = None
    if not isinstance(result, IssuedCredential):
        what = f"a {type(result).__name__} instead of a credential"
    elif not isinstance(result.secret, Secret) or not result.secret.reveal():
        what = "a credential with an empty secret"
    elif not result.valid_at(now, skew):
        what = (f"a credential that expires within the {skew:g} s skew "
                "(expired, or its lifetime is too short for broker.skew_seconds)")
    if what is not None:  # a provider bug or a misconfiguration: retrying will not help
        raise ProviderError(f"the {provider.kind} provider for credential '{name}' returned {what}",
                            retryable=False)
    assert isinstance(result, IssuedCredential)
    return result


def unexpected(name: str, provider: Provider, exc: BaseException, *, retryable: bool = True) -> ProviderError:
    # The exception's text may contain a secret (a token endpoint echoing the request): type only.
    log.error("credential '%s': the %s provider raised %s (message withheld)", name, provider.kind,
              type(exc).__name__)
    return ProviderError(f"the {provider.kind} provider for credential '{name}' failed unexpectedly "
                         f"({type(exc).__name__}); see the proxy log", retryable=retryable)


def revokes_where_issued(provider: Provider, cred: IssuedCredential) -> bool:
    """Whether ``provider`` would revoke ``cred`` at the endpoint that issued it (never elsewhere)."""
    target = _target_id(provider)
    return target is not None and cred.meta.get(REVOKE_AT) == target


def _target_id(provider: Provider) -> str | None:
    target = provider.revocation_target if provider.revocable else None
    return None if target is None else hashlib.sha256(target.encode()).hexdigest()[:16]


def _stamp(cred: IssuedCredential, provider: Provider) -> IssuedCredential:
    target = _target_id(provider)
    if target is None:
        return cred
    return dataclasses.replace(cred, meta={**cred.meta, REVOKE_AT: target})
