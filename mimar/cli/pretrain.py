"""``mimar pretrain``: pretrain a backbone with a recipe."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from mimar.cli.common import signal_number
from mimar.errors import ConfigError


def add_parser(sub) -> None:
    pre = sub.add_parser("pretrain", help="pretrain a backbone with a recipe")
    pre.add_argument("config", help="recipe YAML, e.g. configs/simmim/vit_tiny_fmnist.yaml")
    pre.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    pre.add_argument("--run-dir", help="run folder (default runs/<recipe>-<time>)")
    pre.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=False,
        metavar="auto",
        help="continue the run in --run-dir; '--resume auto' continues it when it has a "
        "checkpoint and starts it otherwise (for torchrun --max-restarts and job requeues)",
    )
    pre.add_argument(
        "--allow-config-change",
        dest="allow_change",
        action="store_true",
        help="--resume: accept a config that differs from RUN/config.yaml (recorded in "
        "RUN/config_changes.jsonl)",
    )
    pre.set_defaults(func=run, extra="overrides")  # key=value words after options: overrides


def run(args) -> int:
    from mimar import runs
    from mimar.config import load_config
    from mimar.engine.loop import NonFiniteLoss
    from mimar.pretrain import pretrain

    resume, overrides = args.resume, list(args.overrides)
    if isinstance(resume, str) and resume != "auto":
        if "=" not in resume:
            raise ConfigError(f"--resume takes no value or 'auto', got {resume!r}")
        resume, overrides = True, [*overrides, resume]  # an override after a bare --resume
    cfg = load_config(args.config, overrides)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = Path(args.run_dir or f"runs/{Path(args.config).stem}-{stamp}")
    if resume == "auto":  # continue when there is something to continue, else start
        if args.run_dir is None:
            raise ConfigError("--resume auto needs --run-dir (the folder to continue or start)")
        resume = runs.newest_checkpoint(run_dir) is not None
    if runs.lock_rank():  # one process per run folder (torchrun: rank 0 takes it)
        runs.lock_run(run_dir)  # held until the command ends; a second start is refused
    if not resume and runs.newest_checkpoint(run_dir) is not None:
        raise ConfigError(
            f"{run_dir} already holds a run: pass --resume to continue it, "
            "or choose another --run-dir"
        )
    try:
        result = pretrain(cfg, run_dir, resume=resume, allow_config_change=args.allow_change)
    except NonFiniteLoss as err:
        print(f"mimar pretrain: {err}", file=sys.stderr)
        return 3
    if result.stopped_by:
        print(
            f"stopped by {result.stopped_by} after step {result.step}; checkpoint saved. "
            f"Continue with: mimar pretrain {args.config} ... --run-dir {run_dir} --resume",
            file=sys.stderr,
        )
        return 128 + signal_number(result.stopped_by)  # as the shell's 143 / 130: not done
    if os.environ.get("RANK", "0") == "0":  # torchrun: one line, not one per process
        print(f"run folder: {run_dir}")
    return 0
