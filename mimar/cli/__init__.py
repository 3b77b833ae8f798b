"""``mimar pretrain | eval | import | export | visualize | data | bench``: the command line.

Errors a user can fix (bad config keys, missing data or checkpoints) are printed as one
line, never as a traceback; ``MIMAR_DEBUG=1`` shows the traceback.

One module per command group; each has ``add_parser(subparsers)``, which registers its
commands with ``set_defaults(func=...)``. Adding a group is its module and one line in
:data:`GROUPS`.
"""

from __future__ import annotations

import argparse
import os
import sys

from mimar import runs
from mimar.cli import bench, data, export, pretrain, weights
from mimar.cli import eval as eval_group
from mimar.cli.common import setup_logging
from mimar.errors import MimarError
from mimar.interrupts import Interrupted, signals_stop_the_command
from mimar.streams import quiet_when_closed

# in the order `mimar --help` lists them
GROUPS = (pretrain, eval_group, weights, data, bench, export)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # key=value overrides may follow options (``eval finetune --checkpoint R finetune.epochs=1``)
    args, extra = parser.parse_known_args(argv)
    stray = [word for word in extra if "=" not in word or word.startswith("-")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        takes = getattr(args, "extra", None)  # the positional list that takes key=value words
        if takes is None:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        setattr(args, takes, [*getattr(args, takes), *extra])
    with quiet_when_closed():  # a closed stdout/stderr turns output off, never the work
        setup_logging()
        try:
            with signals_stop_the_command():  # SIGINT/SIGTERM/SIGHUP: one line, 128 + n
                return args.func(args)
        except MimarError as err:  # bad input: one line; anything else is a bug: its traceback
            if os.environ.get("MIMAR_DEBUG"):
                raise
            print(f"mimar {args.command}: error: {err}", file=sys.stderr)
            return getattr(err, "exit_code", 2)  # 2: bad input; 74: a write failed
        except Interrupted as stop:  # outside a training loop: nothing to save
            print(f"mimar {args.command}: stopped by {stop.signal_name}", file=sys.stderr)
            return stop.exit_code
        finally:
            runs.unlock_all()  # the run lock ends with the command, also when run in-process


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mimar", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    for group in GROUPS:
        group.add_parser(sub)
    return p
