"""FSDP vs DDP on 2 CPU processes (step time, peak memory, checkpoint bytes per rank), and the
checkpoint save / load time of a DCP folder vs the single file.

    python -m benchmarks.fsdp                         # AIM and EVA tiny recipes, both parts
    python -m benchmarks.fsdp --part checkpoint --recipe configs/simmim/vit_base_in1k.yaml

Part ``steps`` runs ``torchrun --nproc-per-node 2 ... mimar pretrain`` for each recipe and
strategy, alternating the two strategies ``--rounds`` times (each process on one thread), and
reports the median images/s of the logged steps after the first ``--skip``, each worker's peak
resident memory (``ru_maxrss``, read by this module's ``--worker`` mode around
``mimar.cli.main``), and the checkpoint bytes each rank wrote (its ``__<rank>_0.distcp`` under
fsdp; the whole ``last.pt``, written by rank 0, under ddp). Part ``checkpoint`` builds the
recipe's method on one process, gives it AdamW state, and times saving and loading its state
as ``checkpoints/last.pt`` (mimar's single file with its content hash) and as a DCP folder,
alternating ``--reps`` times.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ("configs/aim/vit_tiny_fmnist.yaml", "configs/eva/vit_tiny_fmnist.yaml")
TEACHER_RECIPE = "configs/simmim/vit_tiny_fmnist.yaml"  # EVA's teacher: a 1-step SimMIM run


def worker(argv: list[str]) -> None:
    """Run ``mimar <argv>`` in this torchrun worker, then write its peak RSS to
    ``$MIMAR_BENCH_OUT/rss_<rank>.json``."""
    from mimar.cli import main

    code = main(argv)
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    out = Path(os.environ["MIMAR_BENCH_OUT"]) / f"rss_{os.environ.get('RANK', '0')}.json"
    out.write_text(json.dumps({"max_rss_mb": rss_mb}))
    sys.exit(code)


def run_steps(recipe: str, strategy: str, args, tmp: Path) -> dict:
    run = tmp / f"{Path(recipe).parent.name}-{strategy}-{time.monotonic_ns()}"
    words = [
        "pretrain", recipe, f"train.steps={args.steps}", f"data.batch_size={args.batch}",
        f"train.strategy={strategy}", "train.progress=false", f"train.precision={args.precision}",
        "train.checkpoint_every=0", "--run-dir", str(run),
    ]  # fmt: skip
    if "eva" in recipe:
        words.insert(2, f"teacher.path={args.teacher}")
    run.mkdir(parents=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MIMAR_BENCH_OUT": str(run)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           "2", "-m", "benchmarks.fsdp", "--worker", *words]  # fmt: skip
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{recipe} {strategy} failed:\n{out.stderr[-2000:]}")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["images_per_s"] for r in rows if "images_per_s" in r][args.skip :]
    rss = [json.loads((run / f"rss_{r}.json").read_text())["max_rss_mb"] for r in (0, 1)]
    ckpts = run / "checkpoints"
    if strategy == "fsdp":
        per_rank = [(ckpts / "last.dcp" / f"__{r}_0.distcp").stat().st_size for r in (0, 1)]
    else:
        per_rank = [(ckpts / "last.pt").stat().st_size] * 2
    return {"images_per_s": statistics.median(speeds), "rss_mb": rss, "ckpt_bytes": per_rank}


def part_steps(args) -> None:
    with tempfile.TemporaryDirectory(prefix="mimar-fsdp-") as tmp:
        args.teacher = Path(tmp) / "teacher"
        cmd = [sys.executable, "-m", "mimar.cli", "pretrain", TEACHER_RECIPE, "train.steps=1",
               "train.progress=false", "--run-dir", str(args.teacher)]  # fmt: skip
        subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
        for recipe in args.recipes:
            found: dict[str, list[dict]] = {"ddp": [], "fsdp": []}
            for _ in range(args.rounds):
                for strategy in found:  # alternated: load on the machine hits both alike
                    found[strategy].append(run_steps(recipe, strategy, args, Path(tmp)))
            print(f"\n{recipe} (2 processes x 1 thread, global batch {args.batch}, "
                  f"{args.precision}, median of {args.rounds} runs)")  # fmt: skip
            print(f"{'strategy':<9}{'images/s':>10}{'peak RSS/rank MB':>19}{'ckpt MB/rank':>14}")
            for strategy, runs in found.items():
                speed = statistics.median(r["images_per_s"] for r in runs)
                rss = statistics.median(max(r["rss_mb"]) for r in runs)
                ckpt = max(runs[-1]["ckpt_bytes"]) / 1e6
                print(f"{strategy:<9}{speed:>10.1f}{rss:>19.0f}{ckpt:>14.2f}")


def part_checkpoint(args) -> None:
    import mimar
    from mimar.engine import checkpoint
    from mimar.engine.fsdp import ShardedSaver, load_into
    from mimar.engine.optim import build_optimizer
    from mimar.factory import build_method

    torch.set_num_threads(1)
    cfg = mimar.load_config(args.checkpoint_recipe)
    model = build_method(cfg)
    optimizer = build_optimizer(model, cfg.optim, 1e-3)
    for p in model.parameters():
        p.grad = torch.randn_like(p) if p.requires_grad else None
    optimizer.step()  # AdamW state: two moments per parameter
    params = sum(p.numel() for p in model.parameters())
    times: dict[str, list[float]] = {
        k: [] for k in ("file save", "file load", "dcp save", "dcp load")
    }
    meta = {"step": 1, "config": {}, "rng": {"torch": torch.get_rng_state()}}
    with tempfile.TemporaryDirectory(prefix="mimar-ckpt-") as tmp:
        file, folder = Path(tmp) / "last.pt", Path(tmp) / "last.dcp"
        saver = ShardedSaver(model, optimizer, rank=0)
        for _ in range(args.reps):
            tic = time.perf_counter()
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), **meta}
            checkpoint.save(state, file)
            times["file save"].append(time.perf_counter() - tic)
            tic = time.perf_counter()
            loaded = checkpoint.load(file)
            model.load_state_dict(loaded["model"])
            optimizer.load_state_dict(loaded["optimizer"])
            times["file load"].append(time.perf_counter() - tic)
            tic = time.perf_counter()
            saver.save(meta, [folder])
            times["dcp save"].append(time.perf_counter() - tic)
            tic = time.perf_counter()
            load_into(folder, model, optimizer)
            times["dcp load"].append(time.perf_counter() - tic)
        size_file = file.stat().st_size / 1e6
        size_dcp = sum(p.stat().st_size for p in folder.iterdir()) / 1e6
    print(f"\n{args.checkpoint_recipe}: {params / 1e6:.1f} M parameters + AdamW state, one "
          f"process, median of {args.reps} (file {size_file:.0f} MB, "
          f"DCP {size_dcp:.0f} MB)")  # fmt: skip
    for key, values in times.items():
        print(f"{key:<10} {statistics.median(values):7.2f} s")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        return worker(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=("steps", "checkpoint", "both"), default="both")
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--skip", type=int, default=5, help="first logged steps not timed")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="bf16")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--recipe", dest="checkpoint_recipe",
                        default="configs/simmim/vit_base_in1k.yaml")  # fmt: skip
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    if args.part in ("steps", "both"):
        part_steps(args)
    if args.part in ("checkpoint", "both"):
        part_checkpoint(args)


if __name__ == "__main__":
    main()
