"""Run a benchmark: ``python -m bench NAME [options]`` (``make bench`` runs them all).

Each benchmark is a module ``bench/<name>.py`` (or package) with ``main(argv) -> int``.
Benchmarks print their figures and ratios; they never assert timings in the test suite.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
from pathlib import Path


def available() -> list[str]:
    here = Path(__file__).parent
    return sorted(m.name for m in pkgutil.iter_modules([str(here)]) if not m.name.startswith("_"))


def main(argv: list[str]) -> int:
    names = available()
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        print("available:", ", ".join(names) or "none")
        return 0
    selected = [argv[0]] if argv else names
    rest = argv[1:] if argv else []
    for name in selected:
        if name not in names:
            print(f"unknown benchmark {name!r}; available: {', '.join(names)}", file=sys.stderr)
            return 2
        print(f"== bench/{name}")
        code = importlib.import_module(f"bench.{name}").main(rest)
        if code:
            return int(code)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
