"""The frozen-backbone protocols of ``mimar eval`` (kNN, linear probe, attentive probe, LoRA),
one table: protocol name -> how it runs and which options it declares. The protocols that
train a whole network (fine-tuning, dense transfer) are registered above this package, in
:mod:`mimar.protocols`, with the same :class:`EvalProtocol` entries.

Two kinds of frozen entry. A *pooled-feature probe* (kNN, linear) gives ``probe``: it scores one
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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mimar import writes
from mimar.data import ImageSet, iterate_eval_batches
from mimar.errors import ConfigError
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
from mimar.evaluation.options import (
    AttentiveOptions,
    EvalRequest,
    KnnOptions,
    LinearOptions,
    LoraOptions,
    build_request,
)
from mimar.masking import patch_order

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
    out: Path  # the eval/ folder results go to (adapters, pictures)
    cache: Path | None = None  # pooled features by content key (eval/features/); None = off
    unknown: dict[str, int] | None = None  # --unknown-classes wrong: images scored wrong

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

# (train feats, test feats, setup, the protocol's options, epochs) -> result
Probe = Callable[[torch.Tensor, torch.Tensor, EvalSetup, Any, "int | None"], dict]
Run = Callable[[Models, EvalSetup, Any, "int | None"], dict]  # -> {"rows": [...], ...}
Alone = Callable[[EvalRequest], dict]  # the whole request -> {"rows": [...], ...}


@dataclass(frozen=True)
class EvalProtocol:
    """How one protocol runs and what it takes.

    Exactly one of ``probe`` (pooled features), ``run`` (the loaded backbones) and ``alone``
    (needs neither the run's data nor its backbones: fine-tuning builds its own from the
    checkpoint, robustness reads the fine-tuned classifier). ``options``: the protocol's own
    options dataclass (its fields become ``mimar eval`` flags). ``overrides``: the key
    prefixes of the ``key=value`` words it takes (none: it takes no overrides).
    """

    default_epochs: int | None  # None: the protocol trains nothing (or its recipe says)
    help: str
    options: type
    overrides: tuple[str, ...] = ()
    probe: Probe | None = None
    run: Run | None = None
    alone: Alone | None = None

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


def _knn(f_train, f_test, setup: EvalSetup, opts: KnnOptions, epochs) -> dict:
    train, test = setup.train.labels, setup.test.labels
    return knn_classify(f_train, train, f_test, test, k=opts.k, device=setup.device)


def _linear(f_train, f_test, setup: EvalSetup, opts: LinearOptions, epochs: int) -> dict:
    train, test = setup.train.labels, setup.test.labels
    return linear_probe(f_train, train, f_test, test, epochs=epochs, device=setup.device)


def _attentive(models: Models, setup: EvalSetup, opts: AttentiveOptions, epochs: int) -> dict:
    """One attentive-probe row per model, on the mean raw output of ``opts.blocks``."""
    rows = []
    for name, backbone in models:
        chosen = opts.blocks or default_blocks(backbone)
        train, test = setup.extract(extract_block_tokens, backbone, blocks=chosen)  # (N, T, D)
        res = attentive_probe(
            train,
            setup.train.labels,
            test,
            setup.test.labels,
            num_heads=probe_heads(backbone),
            epochs=epochs,
            batch_size=setup.batch_size,
            classifier_bias=opts.classifier_bias,
            device=setup.device,
        )
        where = "blocks " + ",".join(str(b) for b in chosen)
        notes = f"{setup.notes}; {res['params']:,} params"
        rows.append(result_row(name, "attentive", where, res, notes) | {"blocks": list(chosen)})
    return {"rows": rows}


def _lora(models: Models, setup: EvalSetup, opts: LoraOptions, epochs: int) -> dict:
    """One LoRA row per model, trained on a copy of the backbone; each adapter is saved in
    peft's format in RUN/eval/lora-adapter/<model>/."""
    rows = []
    for name, backbone in models:
        adapter_dir = setup.out / "lora-adapter" / name.replace(" ", "-")
        res = lora_finetune(
            copy.deepcopy(backbone),
            setup.train,
            setup.test,
            img_size=setup.img_size,
            rank=opts.lora_rank,
            epochs=epochs,
            batch_size=setup.batch_size,
            attn_mask=setup.attn_mask(backbone),
            device=setup.device,
            autocast_dtype=setup.autocast_dtype,
            adapter_dir=adapter_dir,
        )
        log.info("%s LoRA: %s trainable of %s", name, res["trainable_params"], res["total_params"])
        notes = f"{setup.notes}; {res['trainable_params']:,} trainable / {res['total_params']:,}"
        rows.append(result_row(name, "lora", None, res, notes))
    return {"rows": rows, "lora_rank": opts.lora_rank}


FROZEN_TABLE: dict[str, EvalProtocol] = {
    "knn": EvalProtocol(None, "weighted kNN (k=--k, cosine, T=0.07)", KnnOptions, probe=_knn),
    "linear": EvalProtocol(30, "linear probe, a grid of lrs", LinearOptions, probe=_linear),
    "attentive": EvalProtocol(
        10, "AIM's attentive probe on --blocks", AttentiveOptions, run=_attentive
    ),
    "lora": EvalProtocol(3, "LoRA on attn.qkv/attn.proj + a linear head", LoraOptions, run=_lora),
}
FROZEN: tuple[str, ...] = tuple(FROZEN_TABLE)


def pooled_probes(
    protocols, models: Models, setup: EvalSetup, request: EvalRequest, baselines: bool
) -> dict:
    """Rows of the pooled-feature ``protocols``: raw pixels once, then per model and tap.

    One feature pass per model serves every protocol (and, with ``layer="all"``, every tap):
    they read ``layer`` and ``pool`` from the same options, so every one's options agree.
    """
    specs = {p: FROZEN_TABLE[p] for p in protocols}
    opts = {p: request.options[p] for p in protocols}
    layer, pool = opts[protocols[0]].layer, opts[protocols[0]].pool
    if "knn" in specs and opts["knn"].k > len(setup.train):
        k = opts["knn"].k
        raise ConfigError(f"--k {k}: more neighbours than the {len(setup.train)} train images")
    epochs = {p: spec.epochs(getattr(opts[p], "epochs", None)) for p, spec in specs.items()}
    out: dict[str, dict] = {p: {"rows": []} for p in protocols}
    if baselines:
        f_train, f_test = (_pixels(setup.batches(s)) for s in (setup.train, setup.test))
        for p, spec in specs.items():
            res = spec.probe(f_train, f_test, setup, opts[p], epochs[p])
            out[p]["rows"].append(result_row("raw pixels", p, "pixels", res, setup.notes))
    for name, backbone in models:
        taps = list(tap_indices(backbone)) if layer == "all" else [layer]
        depth = len(tap_indices(backbone))
        if isinstance(layer, int) and not -depth <= layer < depth:
            raise ConfigError(
                f"--layer {layer}: the backbone has blocks 0..{depth - 1} "
                f"(negative counts from the end: -1..-{depth})"
            )
        tic = time.perf_counter()
        f_train, f_test = setup.pooled_features(backbone, taps, pool)
        seconds = time.perf_counter() - tic
        log.info("%s: %d tap(s), features %s in %.1fs", name, len(taps), f_train[0].shape, seconds)
        for p, spec in specs.items():
            rows = []
            for i, tap in enumerate(taps):  # f_train[i]: (N, D) features of tap i
                res = spec.probe(f_train[i], f_test[i], setup, opts[p], epochs[p])
                rows.append(result_row(name, p, tap, res, setup.notes))
            if layer == "all":
                best = _mark_best(rows)
                if name == "pretrained":
                    out[p]["best_layer"] = best
            out[p]["rows"].extend(rows)
    return out


def result_row(model: str, protocol: str, layer: int | str | None, res: dict, notes: str) -> dict:
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


def frozen_request(
    protocols: Sequence[str], overrides: Sequence[str] = (), **values: Any
) -> EvalRequest:
    """An :class:`EvalRequest` of frozen protocols from flat options by field name, e.g.
    ``frozen_request(["knn"], checkpoint=run, k=10)`` (:func:`mimar.protocols.request` takes
    every protocol)."""
    declared = {name: spec.options for name, spec in FROZEN_TABLE.items()}
    return build_request(declared, protocols, values, overrides)
