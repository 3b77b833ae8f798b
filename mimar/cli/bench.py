"""``mimar bench quality | speed``: benchmarks."""

from __future__ import annotations

from pathlib import Path

from mimar.cli.common import float_pair, name_list, signal_number


def add_parser(sub) -> None:
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
    qu.add_argument("--methods", type=name_list, help="comma list (default: all of them)")
    budget = qu.add_mutually_exclusive_group()
    budget.add_argument(
        "--budget-minutes", type=float, help="training wall time per method (default 5)"
    )
    budget.add_argument("--budget-images", type=int, help="or: training images per method")
    qu.add_argument("--protocols", type=name_list, help="comma list (default knn,linear)")
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
        type=float_pair,
        help="RandomResizedCrop scale LO,HI of every method (default 0.2,1.0)",
    )
    qu.add_argument("--max-train", type=int, help="evaluation: first N train images (0 = all)")
    qu.add_argument("--max-test", type=int, help="evaluation: first N test images (0 = all)")
    qu.add_argument("--calibration-steps", type=int, help="steps of each timing run (default 10)")
    qu.set_defaults(func=quality)
    # '+' prefixes: every word after `speed`, options included, goes to speed.main(argv)
    sp = bench_sub.add_parser(
        "speed",
        help="step-time benchmark (arguments go to mimar.bench.speed)",
        prefix_chars="+",
        add_help=False,
    )
    sp.add_argument("argv", nargs="*")
    sp.set_defaults(func=speed)


def quality(args) -> int:
    from mimar.bench.quality import default_out, run_quality

    # the options given (None: not given), by their QualityConfig field names
    names = ("methods", "budget_minutes", "budget_images", "protocols", "seeds", "data")
    names += ("data_root", "teacher", "overrides", "crop_scale", "max_train", "max_test")
    names += ("calibration_steps",)
    given = {k: getattr(args, k) for k in names if getattr(args, k) is not None}
    out = Path(args.out) if args.out else default_out(args.data or "fashion_mnist")
    if run_quality(out, given, resume=args.resume) is None:
        print(f"bench stopped; continue with: mimar bench quality --out {out} --resume")
        return 128 + signal_number("SIGTERM")  # stopped by a signal: not done (as pretrain)
    print(f"bench report: {out / 'report.md'}")
    return 0


def speed(args) -> int:
    from mimar.bench import speed as report  # written separately; imported only when asked for

    return report.main(args.argv) or 0
