"""Expected pretraining speed of every paper recipe, COMPUTED (not measured): each recipe's
model FLOPs per image (one forward and backward, counted as the run's monitor counts them:
``mimar.monitor.efficiency.count_step``, under a FakeTensorMode, so even AIM-7B costs no
memory) against each GPU's dense bf16 peak (``GPU_PEAKS``) at ``TARGET_MFU`` (35 %):

    img/s = TARGET_MFU * peak / (FLOPs per image)

    python benchmarks/expected_speed.py            # prints the markdown table of docs/benchmarks.md
    python benchmarks/expected_speed.py --json runs/speed/expected.json

A frozen CLIP teacher whose weights are not on this machine gets its model's random
initialisation (``mimar.bench.speed.local_teacher``): the same FLOPs, no download.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import mimar  # noqa: E402
from mimar.bench.speed import local_teacher  # noqa: E402
from mimar.monitor.efficiency import GPU_PEAKS, TARGET_MFU, count_step  # noqa: E402

GPUS = ("H100", "H200", "A100", "L40S", "L4", "RTX 4090", "RTX 5090")  # table columns


def paper_recipes() -> list[Path]:
    """Every pretraining recipe that is not a CPU demo (tiny) one."""
    skip = {"finetune", "dense"}
    found = sorted((ROOT / "configs").glob("*/*.yaml"))
    return [p for p in found if p.parent.name not in skip and "tiny" not in p.name]


class _OneImage:
    batch_size, world_size = 1, 1


def flops_per_image(recipe: Path, workdir: Path) -> float:
    extra, _ = local_teacher(str(recipe), [], workdir)
    cfg = mimar.load_config(recipe, [*extra, "train.precision=bf16"])
    try:
        with FakeTensorMode(allow_non_fake_inputs=True):  # parameters without memory
            method = mimar.build_method(cfg)
    except Exception:  # a teacher checkpoint (or a pyramid's set-up) needs real weights
        method = mimar.build_method(cfg)
    return count_step(method, cfg.data, _OneImage, "bf16")["flops"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("recipes", nargs="*", help="default: every paper recipe")
    parser.add_argument("--json", help="also write the numbers here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for recipe in [Path(r).resolve() for r in args.recipes] or paper_recipes():
            flops = flops_per_image(recipe, Path(workdir))
            speeds = {g: TARGET_MFU * GPU_PEAKS[g]["bf16"] * 1e12 / flops for g in GPUS}
            rows.append({"recipe": str(recipe.relative_to(ROOT)), "gflop": flops / 1e9, **speeds})
            print(f"{rows[-1]['recipe']}: {flops / 1e9:.1f} GFLOP per image", file=sys.stderr)
    head = "| recipe | GFLOP / img (fwd+bwd) | " + " | ".join(f"{g} img/s" for g in GPUS) + " |"
    print(head)
    print("|" + "---|" * (2 + len(GPUS)))
    for r in rows:
        cells = " | ".join(f"{r[g]:,.0f}" for g in GPUS)
        print(f"| `{r['recipe']}` | {r['gflop']:,.1f} | {cells} |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"mfu": TARGET_MFU, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
