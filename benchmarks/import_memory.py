"""Peak memory and wall time of ``mimar import`` on a ViT-L-sized release (~1.2 GB).

Writes a synthetic SimMIM ViT-L/16 release (random weights, the official ``simmim-vit``
layout: 24 blocks of width 1024, shared relative position bias, LayerScale, q/v biases, the
pixel decoder; saved as ``{"model": state_dict, "epoch"}``), then runs ``mimar import`` on it
in a fresh process and reports that process's peak RSS and wall time, beside the size of the
file. Not a test: it needs ~4 GB of RAM and ~3 GB of disk.

    python benchmarks/import_memory.py [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

# SimMIM ViT-L/16 at 224 px (SimMIM Tab. 5's ViT-L is the same shape as BEiT-L)
DEPTH, WIDTH, HEADS, PATCH, GRID = 24, 1024, 16, 16, 14


def synthetic_release(path: Path) -> int:
    """Write the release; returns its number of parameters."""
    g = torch.Generator().manual_seed(0)
    table = ((2 * GRID - 1) ** 2 + 3, HEADS)
    sd = {
        "encoder.cls_token": torch.randn(1, 1, WIDTH, generator=g),
        "encoder.mask_token": torch.randn(1, 1, WIDTH, generator=g),
        "encoder.patch_embed.proj.weight": torch.randn(WIDTH, 3, PATCH, PATCH, generator=g),
        "encoder.patch_embed.proj.bias": torch.randn(WIDTH, generator=g),
        "encoder.rel_pos_bias.relative_position_bias_table": torch.randn(*table, generator=g),
    }
    shapes = {
        "norm1.weight": (WIDTH,), "norm1.bias": (WIDTH,), "gamma_1": (WIDTH,),
        "gamma_2": (WIDTH,), "attn.q_bias": (WIDTH,), "attn.v_bias": (WIDTH,),
        "attn.qkv.weight": (3 * WIDTH, WIDTH), "attn.proj.weight": (WIDTH, WIDTH),
        "attn.proj.bias": (WIDTH,), "norm2.weight": (WIDTH,), "norm2.bias": (WIDTH,),
        "mlp.fc1.weight": (4 * WIDTH, WIDTH), "mlp.fc1.bias": (4 * WIDTH,),
        "mlp.fc2.weight": (WIDTH, 4 * WIDTH), "mlp.fc2.bias": (WIDTH,),
    }  # fmt: skip
    for i in range(DEPTH):
        for name, shape in shapes.items():
            sd[f"encoder.blocks.{i}.{name}"] = torch.randn(*shape, generator=g) * 0.02
    sd["encoder.norm.weight"], sd["encoder.norm.bias"] = torch.ones(WIDTH), torch.zeros(WIDTH)
    sd["decoder.0.weight"] = torch.randn(PATCH**2 * 3, WIDTH, 1, 1, generator=g) * 0.02
    sd["decoder.0.bias"] = torch.zeros(PATCH**2 * 3)
    torch.save({"model": sd, "epoch": 799}, path)
    return sum(v.numel() for v in sd.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", help="write the release and run here (default: a temp dir)")
    args = parser.parse_args()
    folder = Path(args.keep or tempfile.mkdtemp(prefix="mimar-import-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    release, run = folder / "simmim_vit_large.pth", folder / "run"
    shutil.rmtree(run, ignore_errors=True)
    try:
        params = synthetic_release(release)
        cmd = [sys.executable, "-m", "mimar.cli", "import", str(release), "--out", str(run)]
        cmd += [f"backbone.num_heads={HEADS}"]
        start = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        wall = time.perf_counter() - start
        peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # Linux: KiB
        result = {
            "params": params,
            "release_bytes": release.stat().st_size,
            "checkpoint_bytes": (run / "checkpoints" / "last.pt").stat().st_size,
            "peak_rss_bytes": peak_kib * 1024,
            "wall_s": round(wall, 1),
            "threads": torch.get_num_threads(),
        }
        result["peak_rss_over_release"] = round(
            result["peak_rss_bytes"] / result["release_bytes"], 2
        )
        print(json.dumps(result, indent=1))
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
