"""Config fuzz, larger than the suite's: N seeded single-place mutations of a valid config file.

    .venv/bin/python bench/fuzz_config.py --count 20000 --seed 1

Prints how many were accepted and refused, and lists every mutation that escaped as an exception
other than ConfigError (a traceback in `check`), hit the validator's safety net, or was refused
with no issue pointing at the changed place. Exit status 1 if any did.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from helpers import config_mutations  # noqa: E402 - the generator the test suite uses


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=20000)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        config_mutations.prepare(directory)
        started = time.monotonic()
        out = config_mutations.run(directory, count=args.count, seed=args.seed)
        took = time.monotonic() - started
    print(f"mutations {args.count} seed {args.seed}: accepted {out.accepted}, refused {out.refused}, "
          f"escaped {len(out.escaped)}, safety-net {len(out.unexpected)}, misplaced {len(out.misplaced)} "
          f"({took:.1f} s)")
    for kind, found in (("escaped", out.escaped), ("safety-net", out.unexpected), ("misplaced", out.misplaced)):
        for line in found[:50]:
            print(f"  {kind}: {line}")
    return 1 if out.escaped or out.unexpected or out.misplaced else 0


if __name__ == "__main__":
    sys.exit(main())
