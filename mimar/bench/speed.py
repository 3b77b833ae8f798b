"""The speed report: ms/step, images/s, model FLOP/s and peak memory of every method's
pretraining step, against its bare backbone's classification step, a matmul peak measured in
the same run and (``--peers``) Hugging Face's implementations of the same models.

    mimar bench speed                                       # every tiny recipe, fp32 and bf16
    mimar bench speed --recipe configs/simmim/vit_tiny_fmnist.yaml --peers
    mimar bench speed --steps 40 --batch 128 backbone.depth=12   # overrides: all
    mimar bench speed --device cuda --json runs/speed/gpu.json

(``python benchmarks/step_time.py`` is the same command.)

Per recipe and precision (``train.precision=fp32`` / ``bf16``), with the attention kernel that
``mimar pretrain`` sets (``train.attention_kernel``): the method's step (mask draw, forward
under autocast, backward, clipping, AdamW, ``after_step``, as mimar/engine/loop.py) and a
classification step of the bare backbone (mean-pooled tokens -> Linear -> cross-entropy on
random labels). All steppers of a recipe, both precisions and the peers alternate step by
step, so load from other processes hits all alike; ms/step is the median.

- FLOPs: ``torch.utils.flop_counter`` over one whole step, forward and backward (matmuls,
  convolutions, attention). Model FLOPs: attention's backward counts its four products, not
  the recomputed scores of the fused kernels, so SDPA and the matmul path count alike; the CPU
  SDPA kernel, unknown to the counter, gets the same formula. FLOP/s = FLOPs / median.
- Matmul peak: the three GEMM shapes (M, K, N) of ``mm`` / ``addmm`` (the linear layers,
  forward and backward) with the most FLOPs in the recipe's steps, timed as a plain
  ``torch.mm`` in fp32 and in bf16 after every round of steps; a precision's peak is the best
  median GFLOP/s of its shapes, and each row reports its FLOP/s as a fraction of it.
- Peak memory per stepper, over one step: CUDA ``max_memory_allocated``; on CPU the peak of
  live tensor storage (a dispatch mode that follows every storage the step creates or touches,
  plus parameters, buffers and AdamW state): no allocator slack, no oneDNN scratch buffers.
  The process's peak RSS is in the JSON's ``machine``.
- A recipe whose teacher is an unset mimar run (EVA, D-iGPT) gets a randomly initialised copy
  of its student backbone as teacher, exported to a temporary file: same cost, no download;
  iTPN-CLIP (a HiViT student) gets the ViT that teaches it in the quality bench.

A table is printed; every number goes to ``--json`` (default runs/speed/step_time.json).
Its sections are the step, what a step costs, the matmul peak, the steppers of a recipe and
the report; benchmarks/attention_kernel.py, aim_prefix.py and itpn_masking.py reuse its
``Stepper``.

Why one file of ~540 lines: the speed report is one command whose parts (a recipe's stepper,
its FLOP and GEMM counts, the matmul peak, the table) are only meaningful together, and the
online monitor reuses the FLOP counting and the matmul peak from here.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
import weakref
from collections import Counter
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

import mimar
from mimar import names, writes
from mimar.engine.optim import build_optimizer
from mimar.engine.precision import autocast, autocast_dtype
from mimar.export import export_timm
from mimar.nn import set_attention_kernel


def tiny_recipes() -> list[str]:
    """Every method's tiny recipe (``mimar.names``, read at call time: a method added to the
    name table is in the report with no edit here)."""
    return [str(path) for path in names.tiny_recipes().values()]


TEACHER_RECIPE = "simmim"  # as the quality bench: its run teaches EVA, D-iGPT and iTPN-CLIP
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
GEMM_SHAPES = 3  # the matmul peak: the best of the recipe's 3 costliest GEMM shapes
aten = torch.ops.aten


class Classifier(nn.Module):
    def __init__(self, backbone: nn.Module, num_classes: int = 10) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.embed_dim, num_classes)

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> dict:
        tokens = self.backbone(images)["tokens"][:, self.backbone.num_prefix_tokens :]
        return {"loss": nn.functional.cross_entropy(self.head(tokens.mean(1)), labels)}


class Stepper:
    """One model + AdamW; ``step()`` runs one training step as the engine does (forward under
    autocast, backward, clipping, update, ``after_step``) and returns its seconds.

    ``kernel``: the attention kernel set around the step (None: the caller's choice stays).
    """

    def __init__(self, model: nn.Module, make_inputs, cfg, kernel: str | None = None) -> None:
        self.model, self.make_inputs, self.kernel = model.train(), make_inputs, kernel
        # train.compile (a recipe key, or `mimar bench speed ... train.compile=true`): the
        # forward compiled as `mimar pretrain` compiles it; its first steps are the warm-up's
        compiled = getattr(getattr(cfg, "train", None), "compile", False)
        self.forward = torch.compile(model) if compiled else model
        self.optimizer = build_optimizer(model, cfg.optim, lr=1e-4)
        self.clip_grad = cfg.optim.clip_grad
        self.device = next(model.parameters()).device
        self.autocast = autocast(self.device, autocast_dtype(cfg.train.precision))
        self.steps = 0

    def step(self) -> float:
        previous = set_attention_kernel(self.kernel) if self.kernel else None
        tic = time.perf_counter()
        inputs = self.make_inputs()
        with self.autocast:
            loss = self.forward(**inputs)["loss"]
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.clip_grad:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad)
        self.optimizer.step()
        self.steps += 1
        if hasattr(self.model, "after_step"):
            self.model.after_step(self.steps)  # EMA teachers, as the engine
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - tic
        if previous is not None:
            set_attention_kernel(previous)
        return elapsed


def images_per_s(steppers: dict, batch: int, steps: int, warmup: int) -> dict:
    """Alternate the steppers step by step, so that load from other processes hits both."""
    seconds = dict.fromkeys(steppers, 0.0)
    for i in range(warmup + steps):
        for name, stepper in steppers.items():
            elapsed = stepper.step()
            if i >= warmup:
                seconds[name] += elapsed
    return {name: steps * batch / s for name, s in seconds.items()}


# --- what one step costs: FLOPs, GEMM shapes, peak memory -----------------------------------


def _sdpa_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _sdpa_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return 2 * sdpa_flop_count(query, key, value)  # d/dq, d/dk of q k^T; d/dp, d/dv of p v


MODEL_FLOPS = {
    aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flops,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_backward_flops,
    aten._scaled_dot_product_flash_attention_backward: _sdpa_backward_flops,
    aten._scaled_dot_product_efficient_attention_backward: _sdpa_backward_flops,
    aten._scaled_dot_product_cudnn_attention_backward: _sdpa_backward_flops,
}


class GemmShapes(TorchDispatchMode):
    """The FLOPs (2 M K N a call) of every ``mm`` / ``addmm`` by shape ``(M, K, N)``."""

    def __init__(self) -> None:
        super().__init__()
        self.flops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (aten.mm, aten.addmm):
            a, b = args[1:3] if func.overloadpacket is aten.addmm else args[:2]
            (m, k), n = a.shape, b.shape[1]
            self.flops[m, k, n] += 2 * m * k * n
        return func(*args, **(kwargs or {}))


class TensorMemory(TorchDispatchMode):
    """Peak bytes of live tensor storage: ``tensors`` (alive throughout) plus every storage an
    op creates or touches, counted until it is freed."""

    def __init__(self, tensors) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.now = 0
        for t in tensors:
            self._add(t)
        self.peak = self.now

    def _add(self, t) -> None:
        if not isinstance(t, torch.Tensor) or t.layout != torch.strided:
            return
        storage = t.untyped_storage()
        key, nbytes = storage.data_ptr(), storage.nbytes()
        if nbytes == 0 or key in self.live:
            return
        self.live[key], self.now = nbytes, self.now + nbytes
        weakref.finalize(storage, self._free, key).atexit = False

    def _free(self, key: int) -> None:
        self.now -= self.live.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten((args, kwargs, out))[0]:
            self._add(t)
        self.peak = max(self.peak, self.now)
        return out


def _resident(stepper: Stepper):
    """Parameters, buffers and optimizer state: alive during the whole step."""
    yield from stepper.model.parameters()
    yield from stepper.model.buffers()
    for state in stepper.optimizer.state.values():
        yield from (v for v in state.values() if isinstance(v, torch.Tensor))


def count_step(stepper: Stepper) -> dict:
    """FLOPs, GEMM shapes and peak memory (bytes) of one untimed step, after one more: the
    first step creates AdamW's state (and on CUDA the library workspaces)."""
    if stepper.steps == 0:
        stepper.step()
    flops, gemms = FlopCounterMode(display=False, custom_mapping=MODEL_FLOPS), GemmShapes()
    cuda = stepper.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    memory = nullcontext() if cuda else TensorMemory(_resident(stepper))
    with flops, gemms, memory:
        stepper.step()
    peak = torch.cuda.max_memory_allocated() if cuda else memory.peak
    return {"flops": flops.get_total_flops(), "gemms": gemms.flops, "peak_bytes": peak}


# --- the matmul peak --------------------------------------------------------------------------


class MatmulPeak:
    """A plain ``torch.mm`` of each shape ``(M, K, N)`` in fp32 and bf16, timed once per
    ``measure()`` (``reps`` calls); a precision's peak is its best median GFLOP/s."""

    def __init__(self, shapes: list, device: torch.device, reps: int = 3) -> None:
        self.reps, self.device = reps, device
        self.operands, self.seconds = {}, {}
        for m, k, n in shapes:
            for precision, dtype in DTYPES.items():
                a = torch.randn(m, k, dtype=dtype, device=device)
                b = torch.randn(k, n, dtype=dtype, device=device)
                torch.mm(a, b)  # first call: allocation, oneDNN's kernel choice
                self.operands[(m, k, n), precision] = (a, b)
                self.seconds[(m, k, n), precision] = []

    def measure(self, keep: bool = True) -> None:
        for key, (a, b) in self.operands.items():
            tic = time.perf_counter()
            for _ in range(self.reps):
                torch.mm(a, b)
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            if keep:
                self.seconds[key].append((time.perf_counter() - tic) / self.reps)

    def report(self) -> dict:
        """Per precision: ``gflops`` (the peak), its ``shape``, and GFLOP/s of every shape."""
        out = {}
        for precision in DTYPES:
            rates = {
                shape: 2 * shape[0] * shape[1] * shape[2] / statistics.median(s) / 1e9
                for (shape, p), s in self.seconds.items()
                if p == precision and s
            }
            best = max(rates, key=rates.get, default=None)
            out[precision] = {
                "gflops": rates.get(best),
                "shape": best,
                "per_shape": {"x".join(map(str, s)): r for s, r in rates.items()},
            }
        return out


# --- the steppers of one recipe ---------------------------------------------------------------


def local_teacher(path: str, overrides: list[str], workdir: Path) -> tuple[list[str], str]:
    """For a recipe whose teacher is an unset mimar run: overrides that give it a randomly
    initialised copy of the student backbone (exported into ``workdir``), and a note. An
    open_clip teacher whose checkpoint is missing gets its model's random initialisation,
    saved into ``workdir`` (the paper recipes' cost without their downloads)."""
    cfg = mimar.load_config(path, overrides)
    if cfg.teacher.kind == "open_clip" and not Path(cfg.teacher.checkpoint or "").is_file():
        import open_clip

        file = workdir / f"{cfg.method.name}_open_clip_teacher.pt"
        state = open_clip.create_model(cfg.teacher.model).state_dict()
        writes.torch_save(state, file, "teacher checkpoint")
        return [f"teacher.checkpoint={file}"], f"teacher: random-init open_clip {cfg.teacher.model}"
    if cfg.teacher.kind != "mimar" or cfg.teacher.path:
        return [], ""
    torch.manual_seed(cfg.train.seed)
    file = workdir / f"{cfg.method.name}_teacher.safetensors"
    if cfg.backbone.name == "vit":
        export_timm(mimar.build_backbone(cfg.backbone), file)
        return [f"teacher.path={file}"], "teacher: random-init copy of the student backbone"
    # Only a ViT exports as a teacher (iTPN-CLIP's student is a HiViT): the ViT of the
    # quality bench's teacher recipe, the network that teaches it there, randomly initialised.
    teacher = mimar.load_config(names.tiny_recipes()[TEACHER_RECIPE], []).backbone
    export_timm(mimar.build_backbone(teacher), file)
    return [f"teacher.path={file}"], f"teacher: random-init ViT of the {TEACHER_RECIPE} recipe"


def mimar_steppers(
    cfg, images: torch.Tensor, labels: torch.Tensor, classify: bool = True
) -> dict[str, Stepper]:
    """The method's pretext step and (``classify``) its bare backbone's classification step."""
    b, device, kernel = images.shape[0], images.device, cfg.train.attention_kernel
    torch.manual_seed(cfg.train.seed)
    method = mimar.build_method(cfg).to(device)

    def corrupted() -> dict:
        drawn = method.sample_corruption(b)  # as the engine, before autocast
        return {"images": images, **{k: v.to(device) for k, v in drawn.items()}}

    steppers = {cfg.method.name: Stepper(method, corrupted, cfg, kernel)}
    if classify:
        torch.manual_seed(cfg.train.seed)
        classifier = Classifier(mimar.build_backbone(cfg.backbone)).to(device)
        labelled = lambda: {"images": images, "labels": labels}
        steppers["classify"] = Stepper(classifier, labelled, without_decay_rules(cfg), kernel)
    return steppers


def without_decay_rules(cfg):
    """``cfg`` without ``optim.weight_decay_on``, whose names belong to the method's backbone
    (iTPN's ``trunk.*``): the same AdamW over the same parameters for other models."""
    return dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, weight_decay_on=()))


def hf_peers(cfg, method: nn.Module, images: torch.Tensor) -> dict[str, tuple]:
    """Hugging Face models of a SimMIM recipe's shape: ``(model, make_inputs, note)`` by name;
    the masked-image models get the method's own mask draw."""
    import transformers as hf

    if cfg.method.name != "simmim":
        return {}
    bb, b = cfg.backbone, images.shape[0]
    shape = dict(image_size=bb.img_size, patch_size=bb.patch_size, num_channels=bb.in_chans)
    shape |= dict(qkv_bias=bb.qkv_bias, layer_norm_eps=getattr(bb, "norm_eps", 1e-5))

    def masked() -> dict:
        hidden = method.sample_corruption(b)["mask"].flatten(1)  # (B, N), True = hidden
        return {"pixel_values": images, "bool_masked_pos": hidden.to(images.device)}

    if bb.name == "swin":
        swin = dict(embed_dim=bb.embed_dim, depths=list(bb.depths), num_heads=list(bb.num_heads))
        swin |= dict(window_size=bb.window_size, mlp_ratio=bb.mlp_ratio)
        stride = bb.patch_size * 2 ** (len(bb.depths) - 1)  # one 2x merge per later stage
        model = hf.SwinForMaskedImageModeling(hf.SwinConfig(**shape, **swin, encoder_stride=stride))
        return {"HF SwinForMaskedImageModeling": (model, masked, "the recipe's mask")}
    vit = dict(
        hidden_size=bb.embed_dim, num_hidden_layers=bb.depth, num_attention_heads=bb.num_heads
    )
    vit |= dict(intermediate_size=int(bb.mlp_ratio * bb.embed_dim))
    mim = hf.ViTForMaskedImageModeling(hf.ViTConfig(**shape, **vit, encoder_stride=bb.patch_size))
    decoder = dict(decoder_hidden_size=bb.embed_dim, decoder_num_hidden_layers=2)
    decoder |= dict(decoder_num_attention_heads=bb.num_heads)
    decoder |= dict(decoder_intermediate_size=4 * bb.embed_dim)
    mae = hf.ViTMAEForPreTraining(hf.ViTMAEConfig(**shape, **vit, **decoder, mask_ratio=0.75))
    mae_note = f"MAE, 75 % dropped; decoder {bb.embed_dim} wide, 2 blocks, {bb.num_heads} heads"
    return {
        "HF ViTForMaskedImageModeling": (mim, masked, "the recipe's mask"),
        "HF ViTMAEForPreTraining": (mae, lambda: {"pixel_values": images}, mae_note),
    }


def peer_steppers(cfg, method: nn.Module, images: torch.Tensor) -> tuple[dict, dict]:
    """Steppers of :func:`hf_peers` and their notes."""
    plain, steppers, notes = without_decay_rules(cfg), {}, {}
    for name, (model, make_inputs, note) in hf_peers(cfg, method, images).items():
        steppers[name] = Stepper(model.to(images.device), make_inputs, plain)
        notes[name] = f"{note}; attention {model.config._attn_implementation}"
    return steppers, notes


# --- one recipe, the table, the JSON ----------------------------------------------------------


def interleave(steppers: dict, peak: MatmulPeak, steps: int, warmup: int) -> dict:
    """Seconds of every timed step: one step of each stepper, then one matmul round, again."""
    seconds = {key: [] for key in steppers}
    for i in range(warmup + steps):
        for key, stepper in steppers.items():
            elapsed = stepper.step()
            if i >= warmup:
                seconds[key].append(elapsed)
        peak.measure(keep=i >= warmup)
    return seconds


def run_recipe(path: str, args, workdir: Path) -> dict:
    """Build, count and time every stepper of one recipe; its JSON record."""
    extra, teacher_note = local_teacher(path, args.overrides, workdir)
    steppers, notes = {}, {}
    for precision in DTYPES:
        cfg = mimar.load_config(path, [*args.overrides, *extra, f"train.precision={precision}"])
        b, c, s = args.batch or cfg.data.batch_size, cfg.backbone.in_chans, cfg.data.img_size
        torch.manual_seed(cfg.train.seed)
        images = torch.randn(b, c, s, s, device=args.device)
        labels = torch.randint(0, 10, (b,), device=args.device)
        ours = mimar_steppers(cfg, images, labels, classify=not args.no_classify)
        notes[cfg.method.name] = teacher_note
        if args.peers:
            theirs, peer_notes = peer_steppers(cfg, ours[cfg.method.name].model, images)
            ours, notes = ours | theirs, notes | peer_notes
        steppers |= {(name, precision): stepper for name, stepper in ours.items()}
    counts = {key: count_step(stepper) for key, stepper in steppers.items()}
    shapes = sum((c["gemms"] for c in counts.values()), Counter()).most_common(GEMM_SHAPES)
    peak = MatmulPeak([shape for shape, _ in shapes], torch.device(args.device))
    seconds = interleave(steppers, peak, args.steps, args.warmup)
    record = {"recipe": path, "batch": b, "img_size": s, "matmul_peak": peak.report()}
    record["attention_kernel"] = cfg.train.attention_kernel  # as mimar pretrain sets it
    record["rows"] = table_rows(seconds, counts, record["matmul_peak"], b, cfg.method.name, notes)
    return record


def table_rows(seconds: dict, counts: dict, peaks: dict, batch: int, pretext: str, notes: dict):
    """One record per (model, precision): times, rates, memory and ratios."""
    ms = {key: 1000 * statistics.median(s) for key, s in seconds.items()}
    classify = any(model == "classify" for model, _ in ms)
    rows = []
    for (model, precision), t in ms.items():
        flops, peak = counts[model, precision]["flops"], peaks[precision]["gflops"]
        gflop_s = flops / t / 1e6
        peer = model.startswith("HF ")
        rows.append(
            {
                "model": model,
                "precision": precision,
                "ms_per_step": t,
                "ms_steps": [1000 * x for x in seconds[model, precision]],
                "images_per_s": 1000 * batch / t,
                "gflop_per_step": flops / 1e9,
                "gflop_per_s": gflop_s,
                "peak_fraction": gflop_s / peak if peak else None,
                "bf16_speedup": ms[model, "fp32"] / t if precision == "bf16" else None,
                "vs_classify": t / ms["classify", precision] if classify else None,  # time
                "mimar_over_hf": t / ms[pretext, precision] if peer else None,  # speed ratio
                "peak_memory_mib": counts[model, precision]["peak_bytes"] / 2**20,
                "note": notes.get(model, ""),
            }
        )
    return rows


COLUMNS = [  # header, row key, width, format ("s": text, left-aligned)
    ("model", "model", 29, "s"),
    ("prec", "precision", 4, "s"),
    ("ms/step", "ms_per_step", 8, ".1f"),
    ("img/s", "images_per_s", 7, ".1f"),
    ("GFLOP/step", "gflop_per_step", 10, ".2f"),
    ("GFLOP/s", "gflop_per_s", 7, ".1f"),
    ("%peak", "peak_fraction", 5, ".1%"),
    ("bf16 x", "bf16_speedup", 6, ".2f"),
    ("/classify", "vs_classify", 9, ".2f"),
    ("mimar/HF", "mimar_over_hf", 8, ".2f"),
    ("MiB", "peak_memory_mib", 6, ".1f"),
    ("note", "note", 1, "s"),
]


def _cell(value, width: int, spec: str) -> str:
    if spec == "s":
        return f"{value:<{width}}"
    return "-".rjust(width) if value is None else f"{value:>{width}{spec}}"


def print_table(records: list[dict]) -> None:
    header = "  ".join(_cell(name, w, "s" if s == "s" else "") for name, _, w, s in COLUMNS)
    for record in records:
        peaks = ", ".join(
            f"{p} {v['gflops']:.1f} GFLOP/s ({'x'.join(map(str, v['shape']))})"
            for p, v in record["matmul_peak"].items()
            if v["gflops"]
        )
        print(
            f"{record['recipe']}: batch {record['batch']}, {record['img_size']} px; "
            f"matmul peak (M x K x N) {peaks}"
        )
        print("  " + header)
        for row in record["rows"]:
            print("  " + "  ".join(_cell(row[k], w, spec) for _, k, w, spec in COLUMNS).rstrip())


def machine(device: str) -> dict:
    """Versions, threads, CPU model, device and the process's peak RSS."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    models = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    info = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": models[0] if models else platform.processor(),
        "cpu_cores": os.cpu_count(),
        "device": device,
        "gpu": torch.cuda.get_device_name(device) if device.startswith("cuda") else None,
        "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # Linux: KiB
    }
    if "transformers" in sys.modules:
        info["transformers"] = sys.modules["transformers"].__version__
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mimar bench speed", description=__doc__.split("\n")[0].replace("\n", " ")
    )
    parser.add_argument("overrides", nargs="*", help="dotted.key=value, for every recipe")
    parser.add_argument("--recipe", action="append", help="repeatable; default: every tiny recipe")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=0, help="0: the recipe's data.batch_size")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--peers", action="store_true", help="Hugging Face models alongside")
    parser.add_argument("--json", default="runs/speed/step_time.json")
    parser.add_argument(
        "--no-classify", action="store_true", help="no classification step (halves the memory)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as workdir:
        records = [run_recipe(path, args, Path(workdir)) for path in args.recipe or tiny_recipes()]
    print_table(records)
    settings = {k: v for k, v in vars(args).items() if k != "json"}
    report = {"machine": machine(args.device), "settings": settings, "recipes": records}
    out = Path(args.json)
    writes.write_text(out, json.dumps(report, indent=2), "speed report")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
