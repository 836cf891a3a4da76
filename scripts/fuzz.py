#!/usr/bin/env python3
"""A longer fuzzing campaign: the properties of tests/test_fuzz.py with many more examples.

    python scripts/fuzz.py --minutes 30                       # every property, 30 minutes in all
    python scripts/fuzz.py --target inversion-files -m 60    # one group of properties
    python scripts/fuzz.py --examples 20000                   # a number of examples per property

Each property runs in its own pytest process with random (not CI's fixed) examples, until its
share of the time is spent or its examples are done; when its time runs out, the failures it saved
are replayed, so one found while time ran out still counts. Hypothesis keeps every failing example
in .hypothesis/ (its example database, in the checkout) and tries them first on the next campaign;
`NULLTEXT_FUZZ_PROFILE=replay pytest tests/test_fuzz.py` replays them alone (CI's derandomized
profile does not read the database). Exit status 1 when a property failed.
"""

from __future__ import annotations

import argparse
import ast
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, "tests", "test_fuzz.py")
GROUPS = {  # group -> words of its properties' names
    "alignment": ("align", "mapper", "words_cover"),
    "text": ("prompt_is", "reweight"),
    "sizes": ("size",),
    "manifests": ("manifest", "jobs"),
    "inversion-files": ("bytes_are_refused", "mutated", "altered_metadata"),
}


def properties() -> list[str]:
    """The test functions of tests/test_fuzz.py that hypothesis drives."""
    tree = ast.parse(open(TESTS, encoding="utf-8").read())
    return [f.name for f in tree.body if isinstance(f, ast.FunctionDef) and f.name.startswith("test_")
            and any(isinstance(d, ast.Call) and getattr(d.func, "id", "") == "given" for d in f.decorator_list)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[2:]))
    p.add_argument("-m", "--minutes", type=float, default=10.0,
                   help="time for the whole campaign, split evenly between the properties (default 10)")
    p.add_argument("--examples", type=int, default=1_000_000,
                   help="examples per property at most (default 1000000: the time decides)")
    p.add_argument("--target", choices=sorted(GROUPS), action="append",
                   help="only this group of properties (repeatable; default: all)")
    args = p.parse_args(argv)
    if args.minutes <= 0 or args.examples <= 0:
        p.error("--minutes and --examples must be positive")
    words = [w for g in (args.target or sorted(GROUPS)) for w in GROUPS[g]]
    chosen = [name for name in properties() if any(w in name for w in words)]
    share = args.minutes * 60 / len(chosen)
    env = dict(os.environ, NULLTEXT_FUZZ_PROFILE="campaign", NULLTEXT_FUZZ_EXAMPLES=str(args.examples))
    env.setdefault("OMP_NUM_THREADS", "1")
    failed = []
    for name in chosen:
        start = time.monotonic()
        cmd = [sys.executable, "-m", "pytest", "-q", "-x", f"{TESTS}::{name}"]
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env)
        try:
            code = proc.wait(timeout=share)
            status = "ok" if code == 0 else "FAILED"
        except subprocess.TimeoutExpired:  # its time is spent: did it save a failure meanwhile?
            proc.kill()  # (not SIGTERM: nulltext's own commands under test would take it for a user's)
            proc.wait()
            code = subprocess.call(cmd, cwd=ROOT, env=dict(env, NULLTEXT_FUZZ_PROFILE="replay"))
            status = "ok (time spent)" if code == 0 else "FAILED"
        if code:
            failed.append(name)
        print(f"== {name}: {status} after {time.monotonic() - start:.0f} s", flush=True)
    print(f"{len(chosen) - len(failed)} of {len(chosen)} properties held" +
          (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
