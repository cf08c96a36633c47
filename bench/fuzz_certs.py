"""Seeded client-certificate fuzz against the identity verifier, in process (issue 9 §3).

Builds ``--count`` odd and malformed certificates with ``tests/helpers/certfuzz.py`` (same seed, same
certificates) and runs each through ``IdentityVerifier.verify`` with two trust domains, each
with its own CA. Prints the outcome counts, the slowest verification and every exception that
is not an identity refusal; exits 1 if there was any.

Usage: .venv/bin/python bench/fuzz_certs.py [--count 20000] [--seed 1]
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))

from helpers.certfuzz import cases  # noqa: E402

from secretless_proxy.dev.certs import make_ca  # noqa: E402
from secretless_proxy.errors import IdentityError  # noqa: E402
from secretless_proxy.identity import IdentityVerifier  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=20000)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    ca, partner = make_ca(common_name="fuzz example.org CA"), make_ca(common_name="fuzz partner CA")
    verifier = IdentityVerifier(bundles={"example.org": [ca.cert], "partner.example": [partner.cert]})
    outcomes: collections.Counter[str] = collections.Counter()
    escaped: collections.Counter[str] = collections.Counter()
    damaged = 0
    slowest = (0.0, "")
    started = time.perf_counter()
    verify_time = 0.0
    for case in cases(count=args.count, seed=args.seed, ca=ca):
        damaged += case.der_damaged
        t = time.perf_counter()
        try:
            verifier.verify(case.chain)
            outcomes["accepted"] += 1
        except IdentityError as exc:
            outcomes[exc.reason + (" (malformed)" if "malformed" in str(exc) else "")] += 1
        except Exception as exc:  # noqa: BLE001 - what this script counts
            escaped[f"{type(exc).__name__} in {case.name}"] += 1
        took = time.perf_counter() - t
        verify_time += took
        slowest = max(slowest, (took, case.name))
    total = time.perf_counter() - started
    print(f"certificates: {args.count} (seed {args.seed}; {damaged} with damaged DER)")
    for name, n in sorted(outcomes.items(), key=lambda kv: -kv[1]):
        print(f"  {name:40} {n:6}")
    print(f"escaped exceptions: {sum(escaped.values())}")
    for name, n in escaped.most_common(20):
        print(f"  {n:6}  {name}")
    print(f"time: {total:.1f} s in all, {verify_time:.2f} s verifying "
          f"({verify_time / args.count * 1e6:.0f} µs each); slowest {slowest[0] * 1e3:.1f} ms ({slowest[1]})")
    return 1 if escaped else 0


if __name__ == "__main__":
    sys.exit(main())
