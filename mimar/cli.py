"""``mimar pretrain | eval | export | visualize``: the command line.

Errors a user can fix (bad config keys, missing data or checkpoints) are printed as one
line, never as a traceback; ``MIMAR_DEBUG=1`` shows the traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

from mimar import runs
from mimar.errors import ConfigError, MimarError, Stopped
from mimar.interrupts import Interrupted, signals_stop_the_command
from mimar.streams import quiet_when_closed


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    # key=value overrides may follow options (``eval finetune --checkpoint R finetune.epochs=1``)
    args, extra = parser.parse_known_args(argv)
    stray = [word for word in extra if "=" not in word or word.startswith("-")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        if args.command == "pretrain":
            args.overrides = [*args.overrides, *extra]
        elif args.command == "eval":
            args.protocols = [*args.protocols, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    with quiet_when_closed():  # a closed stdout/stderr turns output off, never the work
        _setup_logging()
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


def cmd_pretrain(args) -> int:
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
        runs.lock_run(run_dir)  # held until the process ends; a second start is refused
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
        return 128 + _signal_number(result.stopped_by)  # as the shell's 143 / 130: not done
    if os.environ.get("RANK", "0") == "0":  # torchrun: one line, not one per process
        print(f"run folder: {run_dir}")
    return 0


def cmd_eval(args) -> int:
    from mimar.evaluation import EvalConfig, evaluate

    names = {f.name for f in dataclasses.fields(EvalConfig)}
    given = {k: v for k, v in vars(args).items() if k in names}
    words = given.pop("protocols")  # protocols, then any key=value overrides (finetune)
    given["protocols"] = [w for w in words if "=" not in w]
    given["overrides"] = [w for w in words if "=" in w]
    trained = {"finetune", "segment", "detect"} & set(given["protocols"])
    if given["overrides"] and not trained:
        raise ConfigError(
            f"overrides {given['overrides']} apply to the finetune, segment and detect protocols"
        )
    try:
        evaluate(EvalConfig(**given))
    except Stopped as stop:  # nothing written for the stopped protocol; --resume continues it
        print(f"mimar eval: {stop}; continue with the same command and --resume", file=sys.stderr)
        return 128 + _signal_number(stop.signal_name)
    return 0


def cmd_export(args) -> int:
    from mimar.export import export_timm
    from mimar.finetune.run import load_for_export

    out, meta = export_timm(load_for_export(args.checkpoint), args.out)
    print(f"wrote {out} and {meta}")
    return 0


def cmd_visualize(args) -> int:
    import torch

    from mimar.data import iterate_eval_batches, load_images
    from mimar.factory import load_method
    from mimar.viz import has_picture, save_reconstruction

    cfg, method = load_method(args.checkpoint)
    if not has_picture(method):
        raise ConfigError(f"{type(method).__name__} has no reconstruction picture")
    data = cfg.data if args.data is None else replace(cfg.data, root=args.data)
    images = load_images(replace(data, max_images=args.num), args.split)
    batch, _ = next(iter(iterate_eval_batches(images, data.img_size, args.num)))
    generator = torch.Generator().manual_seed(args.seed)
    path = save_reconstruction(
        method, batch, args.out, mean=images.mean, std=images.std, generator=generator
    )
    print(f"wrote {path}")
    return 0


def cmd_data_scenes(args) -> int:
    from mimar.dense.scenes import build_scenes

    summary = build_scenes(
        args.out,
        fmnist_root=args.fmnist_root,
        size=args.size,
        num_train=args.num_train,
        num_test=args.num_test,
        seed=args.seed,
    )
    images, instances = summary["images"], summary["instances"]
    print(
        f"wrote {images['train']} train + {images['test']} test scenes "
        f"({instances['train']} + {instances['test']} instances) to {summary['out']} "
        f"in {summary['seconds']:.1f} s"
    )
    return 0


def cmd_data_shard(args) -> int:
    from mimar.data.shard_writer import write_shards

    summary = write_shards(
        args.folder,
        args.pattern,
        shard_size=args.shard_size,
        seed=args.seed,
        on_bad_image=args.on_bad_image,
        resume=args.resume,
    )
    if summary["skipped"]:
        n, first = len(summary["skipped"]), summary["skipped"][0]
        print(f"left out {n} unreadable image(s), e.g. {first}", file=sys.stderr)
    print(
        f"wrote {summary['shards']} shards ({summary['images']} images, "
        f"{summary['classes']} classes) in {summary['seconds']:.1f} s; train on them with: "
        f"data.name=webdataset 'data.root={summary['root']}'"
    )
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mimar", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

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
    pre.set_defaults(func=cmd_pretrain)

    _add_eval_parser(sub)
    _add_data_parser(sub)
    _add_bench_parser(sub)

    ex = sub.add_parser("export", help="export the backbone to another library")
    ex.add_argument("--checkpoint", required=True, help="run folder or checkpoint file")
    ex.add_argument("--format", choices=["timm"], default="timm")
    ex.add_argument("--out", required=True, help="FILE.safetensors (FILE.json is written beside)")
    ex.set_defaults(func=cmd_export)

    vi = sub.add_parser("visualize", help="draw original / masked / reconstruction rows")
    vi.add_argument("--checkpoint", required=True, help="run folder or checkpoint file")
    vi.add_argument("--out", required=True, help="output PNG")
    vi.add_argument("--data", default=None, help="data root (default: the run's data.root)")
    vi.add_argument("--split", choices=["train", "test"], default="test")
    vi.add_argument("--num", type=int, default=8, help="number of images")
    vi.add_argument("--seed", type=int, default=0, help="seed of the masks drawn")
    vi.set_defaults(func=cmd_visualize)
    return p


def _add_eval_parser(sub) -> None:
    # Every dest is an EvalConfig field: cmd_eval passes them on by name.
    from mimar.evaluation.config import ATTENTIONS
    from mimar.evaluation.features import POOLS
    from mimar.evaluation.protocols import PROTOCOL_TABLE

    ev = sub.add_parser(
        "eval",
        help="evaluate a backbone (kNN, linear and attentive probes, LoRA)",
        description="Evaluate a run's backbone; writes RUN_DIR/eval/<protocol>.json each.",
    )
    ev.add_argument(
        "protocols",
        nargs="+",
        metavar="PROTOCOL",
        help="; ".join(f"{name}: {spec.help}" for name, spec in PROTOCOL_TABLE.items())
        + ". Words with '=' override the recipe: finetune.*/data.* keys (finetune), dense.* keys "
        "(segment, detect)",
    )
    ev.add_argument(
        "--recipe", default=None, help="finetune/segment/detect: recipe YAML (default: CPU recipe)"
    )
    ev.add_argument(
        "--resume", action="store_true", help="finetune/segment/detect: continue an interrupted one"
    )
    ev.add_argument(
        "--neck",
        choices=("pretrained", "scratch"),
        default="pretrained",
        help="segment/detect with iTPN: its pretrained pyramid neck, or that neck re-initialised",
    )
    ev.add_argument("--checkpoint", required=True, help="run folder or checkpoint file")
    ev.add_argument(
        "--layer",
        type=_layer,
        default=None,
        help="kNN/linear: block index, or 'all' (one row per block, best marked); "
        "default: final normed tokens",
    )
    ev.add_argument("--pool", choices=POOLS, default="avg")
    ev.add_argument(
        "--attention",
        choices=ATTENTIONS,
        default="bidirectional",
        help="causal: a token sees itself and the tokens read before it, patches in the model's "
        "own order (AIM's method.order, else raster; AIM Tab. 3d)",
    )
    ev.add_argument(
        "--blocks",
        type=_int_list,
        default=None,
        help="attentive probe: comma list of blocks whose raw outputs are averaged "
        "(default: the last 3)",
    )
    ev.add_argument(
        "--probe-bias",
        dest="classifier_bias",
        action="store_true",
        help="attentive probe: give the classifier a bias (as an earlier ml-aim; "
        "default: none, as ml-aim now)",
    )
    ev.add_argument("--lora-rank", type=int, default=8, help="LoRA rank (alpha 16)")
    ev.add_argument(
        "--data",
        dest="data_root",
        default=None,
        help="data root (default: the run's data.root); segment/detect: a COCO-format folder "
        "(or coco-format:FOLDER), default data/fmnist-scenes",
    )
    ev.add_argument(
        "--out", default=None, help="frozen protocols: results folder (default RUN_DIR/eval)"
    )
    ev.add_argument("--max-train", type=int, default=0, help="subsample the train split (0=all)")
    ev.add_argument("--max-test", type=int, default=0, help="subsample the test split (0=all)")
    pixels = "/".join(name for name, spec in PROTOCOL_TABLE.items() if spec.pixel_row)
    ev.add_argument(
        "--baselines",
        action="store_true",
        help=f"also evaluate raw pixels ({pixels} only) and the randomly initialised backbone",
    )
    ev.add_argument("--batch-size", type=int, default=256)
    ev.add_argument(
        "--no-feature-cache",
        dest="feature_cache",
        action="store_false",
        help="knn/linear: extract again instead of reusing RUN_DIR/eval/features/",
    )
    ev.add_argument("--k", type=int, default=20, help="kNN neighbours")
    defaults = ", ".join(
        f"{name} {spec.default_epochs}"
        for name, spec in PROTOCOL_TABLE.items()
        if spec.default_epochs is not None
    )
    ev.add_argument(
        "--epochs",
        type=int,
        default=None,
        help=f"training epochs of every trained protocol (default: {defaults})",
    )
    ev.add_argument(
        "--device",
        default="auto",
        help="where features and probes run: auto (cuda if available, else cpu), cpu, cuda, ...",
    )
    ev.set_defaults(func=cmd_eval)


def _add_data_parser(sub) -> None:
    da = sub.add_parser("data", help="build datasets")
    data_sub = da.add_subparsers(dest="data_command", required=True)
    sc = data_sub.add_parser(
        "scenes",
        help="Fashion-MNIST scenes: a small dense benchmark in COCO format",
        description="Paste 1-4 Fashion-MNIST items on textured canvases; write images, "
        "semantic label maps and COCO instances (boxes, RLE masks). Deterministic in --seed.",
    )
    sc.add_argument("--out", required=True, help="output folder, e.g. data/fmnist-scenes")
    sc.add_argument("--size", type=int, default=64, help="canvas side in pixels (>= 16)")
    sc.add_argument("--num-train", type=int, default=4000, help="train canvases")
    sc.add_argument("--num-test", type=int, default=1000, help="test canvases")
    sc.add_argument("--seed", type=int, default=0)
    sc.add_argument(
        "--fmnist-root",
        default="/usr/share/datasets/fashion-mnist",
        help="folder with the Fashion-MNIST idx files",
    )
    sc.set_defaults(func=cmd_data_scenes)
    sh = data_sub.add_parser(
        "shard",
        help="pack an image folder into WebDataset shards (data.name=webdataset)",
        description="Write IMAGE_FOLDER's images (labels from class sub-folders) as tar shards "
        "of --shard-size samples in a random order from --seed, their encoded bytes unchanged, "
        "plus shards.json (classes, sample counts) beside them.",
    )
    sh.add_argument("folder", metavar="IMAGE_FOLDER", help="one split's images, e.g. data/train")
    sh.add_argument(
        "pattern", metavar="PATTERN", help="shard names, e.g. 'OUT_DIR/train-%%06d.tar'"
    )
    sh.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    sh.add_argument(
        "--seed", type=int, default=0, help="seed of the order the samples are written in"
    )
    sh.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run of the same command (its complete shards are kept)",
    )
    sh.add_argument(
        "--on-bad-image",
        choices=("error", "skip"),
        default="error",
        help="an image PIL cannot read: stop with its path (error) or leave it out (skip)",
    )
    sh.set_defaults(func=cmd_data_shard)


def cmd_bench_quality(args) -> int:
    from mimar.bench.quality import default_out, run_quality

    # the options given (None: not given), by their QualityConfig field names
    names = ("methods", "budget_minutes", "budget_images", "protocols", "seeds", "data")
    names += ("data_root", "teacher", "overrides", "crop_scale", "max_train", "max_test")
    names += ("calibration_steps",)
    given = {k: getattr(args, k) for k in names if getattr(args, k) is not None}
    out = Path(args.out) if args.out else default_out(args.data or "fashion_mnist")
    if run_quality(out, given, resume=args.resume) is None:
        print(f"bench stopped; continue with: mimar bench quality --out {out} --resume")
        return 128 + _signal_number("SIGTERM")  # stopped by a signal: not done (as pretrain)
    print(f"bench report: {out / 'report.md'}")
    return 0


def cmd_bench_speed(args) -> int:
    from mimar.bench import speed  # written separately; imported only when asked for

    return speed.main(args.argv) or 0


def _add_bench_parser(sub) -> None:
    be = sub.add_parser("bench", help="benchmarks: quality (every method, one budget), speed")
    bench_sub = be.add_subparsers(dest="bench_command", required=True)
    qu = bench_sub.add_parser(
        "quality",
        help="pretrain every method under one budget, evaluate alike, report with error bars",
        description="Calibrate each method's step time, plan train.steps to fit the budget, "
        "pretrain method x seed into OUT/runs/<method>-seed<k>/, evaluate with baselines, and "
        "write OUT/report.md, report.json, accuracy.png, loss_vs_time.png, pictures.png. "
        "Options left out on --resume keep the bench's stored values.",
    )
    qu.add_argument("--methods", type=_name_list, help="comma list (default: all of them)")
    budget = qu.add_mutually_exclusive_group()
    budget.add_argument(
        "--budget-minutes", type=float, help="training wall time per method (default 5)"
    )
    budget.add_argument("--budget-images", type=int, help="or: training images per method")
    qu.add_argument("--protocols", type=_name_list, help="comma list (default knn,linear)")
    qu.add_argument("--seeds", type=int, help="seeds 0..N-1 per method (default 1)")
    qu.add_argument("--out", help="bench folder (default runs/bench-<data>)")
    qu.add_argument("--resume", action="store_true", help="continue the bench in --out")
    qu.add_argument(
        "--data",
        choices=("fashion_mnist", "image_folder", "synthetic"),
        help="data set of every method (default fashion_mnist)",
    )
    qu.add_argument("--data-root", help="its folder (default: the recipes' Fashion-MNIST)")
    qu.add_argument(
        "--teacher",
        help="a mimar run that teaches EVA/D-iGPT/iTPN-CLIP (default: the bench's "
        "own SimMIM run of the same seed)",
    )
    qu.add_argument(
        "--set",
        dest="overrides",
        nargs="+",
        action="extend",
        metavar="[METHOD:]KEY=VALUE",
        help="recipe overrides for every method, or for one with METHOD: (e.g. "
        "aim:method.head_depth=2)",
    )
    qu.add_argument(
        "--crop-scale",
        type=_float_pair,
        help="RandomResizedCrop scale LO,HI of every method (default 0.2,1.0)",
    )
    qu.add_argument("--max-train", type=int, help="evaluation: first N train images (0 = all)")
    qu.add_argument("--max-test", type=int, help="evaluation: first N test images (0 = all)")
    qu.add_argument("--calibration-steps", type=int, help="steps of each timing run (default 10)")
    qu.set_defaults(func=cmd_bench_quality)
    # '+' prefixes: every word after `speed`, options included, goes to speed.main(argv)
    sp = bench_sub.add_parser(
        "speed",
        help="step-time benchmark (arguments go to mimar.bench.speed)",
        prefix_chars="+",
        add_help=False,
    )
    sp.add_argument("argv", nargs="*")
    sp.set_defaults(func=cmd_bench_speed)


def _name_list(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


def _float_pair(value: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LO,HI, got {value!r}") from None
    return lo, hi


def _layer(value: str) -> int | str:
    if value == "all":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a block index or 'all', got {value!r}"
        ) from None


def _signal_number(name: str) -> int:
    """SIGTERM -> 15; a stop another rank saw (its signal unknown here) counts as SIGTERM."""
    import signal

    return int(getattr(signal, name, signal.SIGTERM))


def _int_list(value: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in value.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {value!r}") from None


def _setup_logging() -> None:
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format="%(asctime)s %(message)s",
        datefmt="%H:%M:%S",
    )


if __name__ == "__main__":
    sys.exit(main())
