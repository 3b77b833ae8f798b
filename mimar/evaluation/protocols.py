"""The protocols of ``mimar eval``, one table: protocol name -> how it runs.

Two kinds of entry. A *pooled-feature probe* (kNN, linear) gives ``probe``: it scores one
``(N, D)`` feature matrix per model and tap, and all such probes of one evaluation share one
feature pass per model; raw pixels are such a matrix too, so exactly these protocols have a
raw-pixel control row. The others (attentive probe, LoRA) give ``run``, which does its own
extraction or training for every model.

The controls answer "what did pretraining buy?": raw pixels, and the very same backbone at
its random initialisation. ``layer="all"`` taps every block in one forward pass, the probe runs
per block, and the block with the highest *test* top-1 is marked "best" (a selection on the
test set: an analysis tool, not a headline number). The attentive probe reads ``blocks``
instead; LoRA always trains on the final tokens.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from mimar import runs, writes
from mimar.data import ImageSet, iterate_eval_batches
from mimar.errors import ConfigError, Stopped
from mimar.evaluation.attentive import attentive_probe, default_blocks, probe_heads
from mimar.evaluation.features import (
    causal_mask,
    extract_block_tokens,
    extract_layer_features,
    tap_indices,
)
from mimar.evaluation.knn import knn_classify
from mimar.evaluation.linear import linear_probe
from mimar.evaluation.lora import lora_finetune
from mimar.masking import patch_order

if TYPE_CHECKING:
    from mimar.evaluation.config import EvalConfig

log = logging.getLogger("mimar")

Models = list[tuple[str, nn.Module]]  # (row name, backbone on the setup's device)


@dataclass(frozen=True)
class EvalSetup:
    """What every protocol shares: the data, how to batch it, where and how to run."""

    train: ImageSet
    test: ImageSet
    img_size: int
    batch_size: int
    autocast_dtype: torch.dtype | None
    device: torch.device
    causal: bool
    order: str  # the model's patch order (masking.patch_order kinds): what causal follows
    order_seed: int
    notes: str
    cache: Path | None = None  # pooled features by content key (eval/features/); None = off

    def batches(self, images: ImageSet):
        return iterate_eval_batches(images, self.img_size, self.batch_size)

    def attn_mask(self, backbone: nn.Module) -> torch.Tensor | None:
        """None (full attention), or the causal mask in the model's own patch order."""
        if not self.causal:
            return None
        order = patch_order(self.order, backbone.grid_size, self.order_seed)  # (N,)
        return causal_mask(backbone.num_prefix_tokens + backbone.num_patches, order)

    def extract(self, extract, backbone: nn.Module, **kwargs) -> tuple[torch.Tensor, ...]:
        """``extract(...)`` features of the train and the test split (labels dropped)."""
        return tuple(
            extract(
                backbone,
                self.batches(images),
                attn_mask=self.attn_mask(backbone),
                device=self.device,
                autocast_dtype=self.autocast_dtype,
                progress=True,
                **kwargs,
            )[0]
            for images in (self.train, self.test)
        )

    def pooled_features(self, backbone: nn.Module, taps: list, pool: str) -> tuple[list, list]:
        """Pooled train and test features of ``taps`` (one forward pass per batch), from the
        feature cache when an earlier evaluation stored them under the same content key."""
        path = None if self.cache is None else self.cache / f"{self._key(backbone, taps, pool)}.pt"
        if path is not None and path.is_file():
            try:
                saved = torch.load(path, weights_only=True)
                log.info("features from the cache %s", path)
                return saved["train"], saved["test"]
            except Exception as err:  # a damaged file is recomputed and replaced
                log.warning("ignoring the unreadable feature cache %s: %s", path, err)
        feats = self.extract(extract_layer_features, backbone, layers=taps, pool=pool)
        if path is not None:
            with writes.optional("the feature cache"):  # a full cache disk stops no eval
                writes.torch_save({"train": feats[0], "test": feats[1]}, path, "feature cache")
        return feats

    def _key(self, backbone: nn.Module, taps: list, pool: str) -> str:
        """sha256 of everything the features depend on: the weights, the images, their view
        and normalisation, the taps, pool, attention mask, precision and extraction code."""
        digest = hashlib.sha256(f"{FEATURES_VERSION} {taps} {pool} {self.img_size}".encode())
        digest.update(f"{self.autocast_dtype} {self.device.type}".encode())
        mask = self.attn_mask(backbone)
        tensors = [("mask", mask)] if mask is not None else []
        tensors += list(backbone.state_dict().items())
        for split, images in (("train", self.train), ("test", self.test)):
            digest.update(f"{split} {images.mean} {images.std}".encode())
            tensors.append((split, images.images))
        for name, t in tensors:
            t = t.detach().cpu().contiguous()
            digest.update(f"{name} {t.dtype} {tuple(t.shape)}".encode())
            digest.update(t.flatten().view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()[:32]


# Bump when extraction changes its numbers (cached features of older code are then unused).
FEATURES_VERSION = 2  # 2: fused bias/GELU linears (mimar.nn.fused); pieces of 64 and 128 agree

Probe = Callable[[torch.Tensor, torch.Tensor, EvalSetup, "EvalConfig", "int | None"], dict]
Run = Callable[[Models, EvalSetup, "EvalConfig", "int | None"], dict]


@dataclass(frozen=True)
class EvalProtocol:
    """How one protocol runs: exactly one of ``probe`` (pooled features), ``run`` (the loaded
    backbones) and ``alone`` (needs neither the run's data nor its backbones: fine-tuning
    builds its own from the checkpoint, robustness reads the fine-tuned classifier)."""

    default_epochs: int | None  # None: the protocol trains nothing (or its recipe says)
    help: str
    probe: Probe | None = None  # (train feats, test feats, setup, cfg, epochs) -> result
    run: Run | None = None  # (models, setup, cfg, epochs) -> {"rows": [...], ...}
    alone: Callable[[EvalConfig], dict] | None = None  # cfg -> {"rows": [...], ...}

    def __post_init__(self) -> None:
        if sum(f is not None for f in (self.probe, self.run, self.alone)) != 1:
            raise ValueError("an EvalProtocol has exactly one of probe, run and alone")

    @property
    def pixel_row(self) -> bool:
        """``--baselines`` adds a raw-pixel row: pooled-feature probes only."""
        return self.probe is not None

    def epochs(self, requested: int | None) -> int | None:
        """Training epochs: ``requested`` (``--epochs``) or the default; None if untrained."""
        if self.default_epochs is None:
            return None
        return self.default_epochs if requested is None else requested


def _knn(f_train, f_test, setup: EvalSetup, cfg: EvalConfig, epochs) -> dict:
    train, test = setup.train.labels, setup.test.labels
    return knn_classify(f_train, train, f_test, test, k=cfg.k, device=setup.device)


def _linear(f_train, f_test, setup: EvalSetup, cfg: EvalConfig, epochs: int) -> dict:
    train, test = setup.train.labels, setup.test.labels
    return linear_probe(f_train, train, f_test, test, epochs=epochs, device=setup.device)


def _attentive(models: Models, setup: EvalSetup, cfg: EvalConfig, epochs: int) -> dict:
    """One attentive-probe row per model, on the mean raw output of ``cfg.blocks``."""
    rows = []
    for name, backbone in models:
        chosen = cfg.blocks or default_blocks(backbone)
        train, test = setup.extract(extract_block_tokens, backbone, blocks=chosen)  # (N, T, D)
        res = attentive_probe(
            train,
            setup.train.labels,
            test,
            setup.test.labels,
            num_heads=probe_heads(backbone),
            epochs=epochs,
            batch_size=setup.batch_size,
            classifier_bias=cfg.classifier_bias,
            device=setup.device,
        )
        where = "blocks " + ",".join(str(b) for b in chosen)
        notes = f"{setup.notes}; {res['params']:,} params"
        rows.append(_row(name, "attentive", where, res, notes) | {"blocks": list(chosen)})
    return {"rows": rows}


def _lora(models: Models, setup: EvalSetup, cfg: EvalConfig, epochs: int) -> dict:
    """One LoRA row per model, trained on a copy of the backbone; each adapter is saved in
    peft's format in RUN/eval/lora-adapter/<model>/."""
    from mimar.evaluation.runner import run_folder

    rows = []
    for name, backbone in models:
        adapter_dir = (
            run_folder(cfg.checkpoint) / runs.EVAL / "lora-adapter" / name.replace(" ", "-")
        )
        res = lora_finetune(
            copy.deepcopy(backbone),
            setup.train,
            setup.test,
            img_size=setup.img_size,
            rank=cfg.lora_rank,
            epochs=epochs,
            batch_size=setup.batch_size,
            attn_mask=setup.attn_mask(backbone),
            device=setup.device,
            autocast_dtype=setup.autocast_dtype,
            adapter_dir=adapter_dir,
        )
        log.info("%s LoRA: %s trainable of %s", name, res["trainable_params"], res["total_params"])
        notes = f"{setup.notes}; {res['trainable_params']:,} trainable / {res['total_params']:,}"
        rows.append(_row(name, "lora", None, res, notes))
    return {"rows": rows, "lora_rank": cfg.lora_rank}


def _finetune(cfg: EvalConfig) -> dict:
    """End-to-end fine-tuning with layer decay (``mimar.finetune``): its own run folder per
    row; with ``--baselines`` the same recipe from random initialisation first."""
    from mimar.finetune.run import finetune  # the fine-tune engine, only when asked for

    rows = []
    for scratch in (True, False) if cfg.baselines else (False,):
        tic = time.perf_counter()
        res = finetune(
            cfg.checkpoint,
            recipe=cfg.recipe,
            overrides=_overrides(cfg, dense=False),
            max_train=cfg.max_train,
            max_test=cfg.max_test,
            scratch=scratch,
            resume=cfg.resume,
        )
        if res.get("stopped_by"):
            raise Stopped(res["stopped_by"], "fine-tuning")
        res["seconds"] = round(time.perf_counter() - tic, 1)
        notes = f"final epoch of {res.get('epochs')}"
        if res.get("best_top1") is not None:
            notes += f"; best {res['best_top1']:.2f} at epoch {res['best_epoch']:g}"
        notes += f"; {res.get('n_train')} train; {res['seconds'] / 60:.1f} min"
        name = "random init" if scratch else "pretrained"
        rows.append(_row(name, "finetune", "all blocks", res, notes))
    return {"rows": rows}


def _dense(task: str) -> Callable[[EvalConfig], dict]:
    """Dense transfer (``mimar.dense``): the pretrained backbone (``--neck scratch``: iTPN's
    trunk with a fresh neck) fine-tuned with a ``task`` head on the scene benchmark or
    ``--data``; with ``--baselines`` the same recipe from random initialisation first."""

    def run(cfg: EvalConfig) -> dict:
        from mimar.dense.run import HEADLINE, dense_finetune  # only when asked for

        headline, rows, out = HEADLINE[task], [], {}
        for scratch in (True, False) if cfg.baselines else (False,):
            res = dense_finetune(
                cfg.checkpoint,
                task,
                data=cfg.data_root,
                recipe=cfg.recipe,
                overrides=_overrides(cfg, dense=True),
                max_train=cfg.max_train,
                max_test=cfg.max_test,
                scratch=scratch,
                neck=cfg.neck,
                resume=cfg.resume,
            )
            if res.get("stopped_by"):
                raise Stopped(res["stopped_by"], task)
            scores = {k: v for k, v in res.items() if k in DENSE_SCORES}
            notes = ", ".join(f"{k} {v:.2f}" for k, v in scores.items() if v is not None)
            notes += f"; {res['n_train']} train / {res['n_test']} test at {res['img_size']} px"
            notes += f"; {res['epochs']} epochs; {res['seconds'] / 60:.1f} min"
            name = "random init" if scratch else "pretrained"
            if not scratch and cfg.neck == "scratch":
                name = "pretrained, scratch neck"
            where = "all blocks + neck" if not scratch else "all"
            rows.append(
                _row(name, f"{task} ({headline})", where, res | {"top1": res[headline]}, notes)
            )
            out |= {f"scratch_{k}" if scratch else k: v for k, v in scores.items()}
        return {"rows": rows, "neck": cfg.neck, **out}

    return run


DENSE_SCORES = ("miou", "pixel_accuracy", "ap", "ap50", "ap75")


def _overrides(cfg: EvalConfig, dense: bool) -> tuple[str, ...]:
    """The overrides of the fine-tune (``dense=False``) or the dense recipe: split by the
    ``dense.`` prefix when both run, else all of them (a misspelt key then fails loudly)."""
    if not ({"segment", "detect"} & set(cfg.protocols) and "finetune" in cfg.protocols):
        return cfg.overrides
    return tuple(o for o in cfg.overrides if o.startswith("dense.") == dense)


def _robustness(cfg: EvalConfig) -> dict:
    """The fine-tuned classifier (and with ``--baselines`` the from-scratch one) on
    ImageNet-C-style corrupted copies of its test set; writes robustness.png and
    corruptions.png beside the JSON."""
    from mimar.config import build_section
    from mimar.data import DataConfig, load_images
    from mimar.evaluation import robustness as rob
    from mimar.evaluation.precision import resolve_device
    from mimar.finetune.run import load_finetuned

    run_dir, device = _run_folder(cfg.checkpoint), resolve_device(cfg.device)
    rows, curves, test = [], [], None
    for scratch in (True, False) if cfg.baselines else (False,):
        classifier, ft_cfg = load_finetuned(run_dir, scratch)  # one clear line if missing
        data = build_section(DataConfig, ft_cfg["data"], "data")
        if test is None:  # the fine-tune's own test split
            test = load_images(replace(data, max_images=cfg.max_test), "test")
        res = rob.evaluate_robustness(
            _in_precision(classifier.to(device).logits, device, ft_cfg["finetune"]["precision"]),
            test,
            img_size=data.img_size,
            batch_size=cfg.batch_size,
            device=device,
        )
        name = "random init" if scratch else "pretrained"
        notes = f"{len(test)} test images; clean {res['clean_top1']:.2f}; "
        notes += f"{len(rob.CORRUPTIONS)} corruptions x 5 severities"
        res_row = res | {"top1": res["mean_corruption_top1"]}
        rows.append(_row(name, "robustness", "mean corruption", res_row, notes))
        curves.append((f"{name} fine-tune", res))
    out = run_dir / runs.EVAL
    rob.plot_robustness(curves, out / "robustness.png")
    rob.plot_corruptions(test.images[0], out / "corruptions.png")
    return {"rows": rows, "n_test": len(test)}


def _in_precision(logits, device, precision: str):
    """``logits`` under the autocast of ``precision``, as the fine-tune evaluated its test set,
    so that the clean row equals its final top-1. In bf16 `mimar eval finetune robustness
    --max-train 1280 --max-test 500 --baselines` took 62 s instead of 124 s in fp32 here."""
    from mimar.evaluation.precision import autocast, autocast_dtype

    def classify(images):
        with autocast(device, autocast_dtype(precision)):
            return logits(images)

    return classify


def _run_folder(checkpoint) -> Path:
    path = Path(checkpoint)
    return path if path.is_dir() else runs.run_of_checkpoint(path)


PROTOCOL_TABLE: dict[str, EvalProtocol] = {
    "knn": EvalProtocol(None, "weighted kNN (k=--k, cosine, T=0.07)", probe=_knn),
    "linear": EvalProtocol(30, "linear probe, a grid of lrs", probe=_linear),
    "attentive": EvalProtocol(10, "AIM's attentive probe on --blocks", run=_attentive),
    "lora": EvalProtocol(3, "LoRA on attn.qkv/attn.proj + a linear head", run=_lora),
    "finetune": EvalProtocol(
        None, "end-to-end fine-tuning with layer decay (--recipe, finetune.* keys)", alone=_finetune
    ),
    "robustness": EvalProtocol(
        None, "the fine-tuned classifier on corrupted test sets", alone=_robustness
    ),
    "segment": EvalProtocol(
        None,
        "semantic segmentation (UPerNet) on the scenes or --data: mIoU",
        alone=_dense("segment"),
    ),
    "detect": EvalProtocol(
        None, "detection (Faster R-CNN) on the scenes or --data: box AP", alone=_dense("detect")
    ),
}
PROTOCOLS: tuple[str, ...] = tuple(PROTOCOL_TABLE)


def pooled_probes(protocols, models: Models, setup: EvalSetup, cfg: EvalConfig) -> dict:
    """Rows of the pooled-feature ``protocols``: raw pixels once, then per model and tap.

    One feature pass per model serves every protocol (and, with ``layer="all"``, every tap).
    """
    specs = {p: PROTOCOL_TABLE[p] for p in protocols}
    if "knn" in specs and cfg.k > len(setup.train):
        raise ConfigError(f"--k {cfg.k}: more neighbours than the {len(setup.train)} train images")
    epochs = {p: spec.epochs(cfg.epochs) for p, spec in specs.items()}
    out: dict[str, dict] = {p: {"rows": []} for p in protocols}
    if cfg.baselines:
        f_train, f_test = (_pixels(setup.batches(s)) for s in (setup.train, setup.test))
        for p, spec in specs.items():
            res = spec.probe(f_train, f_test, setup, cfg, epochs[p])
            out[p]["rows"].append(_row("raw pixels", p, "pixels", res, setup.notes))
    for name, backbone in models:
        taps = list(tap_indices(backbone)) if cfg.layer == "all" else [cfg.layer]
        depth = len(tap_indices(backbone))
        if isinstance(cfg.layer, int) and not -depth <= cfg.layer < depth:
            raise ConfigError(
                f"--layer {cfg.layer}: the backbone has blocks 0..{depth - 1} "
                f"(negative counts from the end: -1..-{depth})"
            )
        tic = time.perf_counter()
        f_train, f_test = setup.pooled_features(backbone, taps, cfg.pool)
        seconds = time.perf_counter() - tic
        log.info("%s: %d tap(s), features %s in %.1fs", name, len(taps), f_train[0].shape, seconds)
        for p, spec in specs.items():
            rows = []
            for i, tap in enumerate(taps):  # f_train[i]: (N, D) features of tap i
                res = spec.probe(f_train[i], f_test[i], setup, cfg, epochs[p])
                rows.append(_row(name, p, tap, res, setup.notes))
            if cfg.layer == "all":
                best = _mark_best(rows)
                if name == "pretrained":
                    out[p]["best_layer"] = best
            out[p]["rows"].extend(rows)
    return out


def _row(model: str, protocol: str, layer: int | str | None, res: dict, notes: str) -> dict:
    """One table/JSON row; ``layer`` None = final tokens, an int = that block, else as is."""
    where = "final" if layer is None else f"block {layer}" if isinstance(layer, int) else layer
    block = layer if isinstance(layer, int) else None
    return {
        "model": model,
        "protocol": protocol,
        "layer": where,
        "block": block,
        "top1": res["top1"],
        "best": False,
        "notes": notes,
        "details": res,
    }


def _mark_best(rows: list[dict]) -> int:
    """Flag the row with the highest top-1 (the shallower block on ties); return its block."""
    best = max(rows, key=lambda r: r["top1"])  # max keeps the first maximum
    best["best"] = True
    best["notes"] = f"best; {best['notes']}"
    return best["block"]


def _pixels(batches) -> torch.Tensor:
    """Raw-pixel control: the normalised image as a vector."""
    return torch.cat([b.flatten(1) for b, _ in batches])
