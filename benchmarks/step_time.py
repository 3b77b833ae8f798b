"""The speed report, ``mimar bench speed``: this script is the same command (the code lives in
mimar/bench/speed.py so that the installed ``mimar`` has it)."""

from mimar.bench.speed import main

if __name__ == "__main__":
    raise SystemExit(main())
