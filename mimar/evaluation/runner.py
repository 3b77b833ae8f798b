"""``mimar eval``: a run's backbone (and controls) -> kNN, linear, attentive probes and LoRA.

The controls answer "what did pretraining buy?": raw pixels, and the very same backbone at
its random initialisation (same seed, so it is the network the run started from). Raw pixels
are a control for kNN and linear only: the attentive probe needs tokens and LoRA a network,
so those two protocols skip that row.

* ``layer="all"`` (kNN/linear): every block is tapped in one forward pass per batch, the probe
  runs per block, and the block with the highest *test* top-1 is marked "best" (a selection
  on the test set: an analysis tool, not a headline number). The attentive probe reads
  ``blocks`` instead; LoRA always trains on the final tokens.
* ``attention="causal"``: a lower-triangular mask over the whole token sequence (prefix
  included) replaces full attention in every protocol, LoRA training included (AIM Table 3d).
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from mimar.data import ImageSet, iterate_eval_batches, load_images
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
from mimar.evaluation.report import print_results, write_json
from mimar.loading import load_backbone, load_run, random_init_backbone, resolve_checkpoint

log = logging.getLogger("mimar")

PROTOCOLS: tuple[str, ...] = ("knn", "linear", "attentive", "lora")
ATTENTIONS: tuple[str, ...] = ("bidirectional", "causal")
DEFAULT_EPOCHS: dict[str, int | None] = {
    "knn": None,
    "linear": 30,
    "attentive": 10,
    "lora": 3,
}  # kNN trains nothing


@dataclass(frozen=True)
class _Setup:
    """What every protocol shares: the data, how to batch it, where and how to run."""

    train: ImageSet
    test: ImageSet
    img_size: int
    batch_size: int
    autocast_dtype: torch.dtype | None
    causal: bool
    device: torch.device
    notes: str

    def batches(self, images: ImageSet):
        return iterate_eval_batches(images, self.img_size, self.batch_size)

    def attn_mask(self, backbone: nn.Module) -> torch.Tensor | None:
        if not self.causal:
            return None
        return causal_mask(backbone.num_prefix_tokens + backbone.num_patches)


def run_folder(checkpoint: str | Path) -> Path:
    """Where ``eval/`` goes: the run folder itself, or the one a checkpoint file sits in."""
    path = Path(checkpoint)
    if path.is_dir():
        return path
    ckpt = resolve_checkpoint(path)
    return ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent


def evaluate(
    protocols: list[str],
    checkpoint: str | Path,
    *,
    layer: int | str | None = None,
    pool: str = "avg",
    data_root: str | None = None,
    max_train: int = 0,
    max_test: int = 0,
    baselines: bool = False,
    batch_size: int = 256,
    k: int = 20,
    epochs: int | None = None,
    attention: str = "bidirectional",
    blocks: tuple[int, ...] | None = None,
    lora_rank: int = 8,
) -> dict[str, list[dict]]:
    """Run ``protocols``, print one table, write ``RUN_DIR/eval/<protocol>.json`` each.

    ``layer``: None (final normed tokens), a block index, or "all". ``epochs`` None picks
    each protocol's default (:data:`DEFAULT_EPOCHS`). Returns the rows per protocol.
    """
    _check(protocols, layer, attention)
    cfg, _ = load_run(checkpoint)
    data = cfg.data if data_root is None else replace(cfg.data, root=data_root)
    setup = _build_setup(cfg, data, max_train, max_test, batch_size, attention == "causal")
    models = [("pretrained", load_backbone(checkpoint))]
    if baselines:
        models.insert(0, ("random init", random_init_backbone(cfg)))
    models = [(name, backbone.to(setup.device)) for name, backbone in models]
    n_epochs = {p: DEFAULT_EPOCHS[p] if epochs is None or p == "knn" else epochs for p in protocols}

    results: dict[str, dict] = {}
    frozen = [p for p in protocols if p in ("knn", "linear")]
    if frozen:
        results |= _frozen_probes(frozen, models, setup, layer, pool, k, n_epochs, baselines)
    if "attentive" in protocols:
        results["attentive"] = _attentive(models, setup, blocks, n_epochs["attentive"])
    if "lora" in protocols:
        results["lora"] = _lora(models, setup, lora_rank, n_epochs["lora"])

    header = {"checkpoint": str(checkpoint), "pool": pool, "layer": layer}
    header |= {"attention": attention, "n_train": len(setup.train), "n_test": len(setup.test)}
    for protocol in protocols:
        payload = {"protocol": protocol, **header, "epochs": n_epochs[protocol]}
        write_json(
            run_folder(checkpoint) / "eval" / f"{protocol}.json", payload | results[protocol]
        )
    title = f"{cfg.method.name} {cfg.backbone.name}: {data.name} test top-1 (%)"
    print_results([r for p in protocols for r in results[p]["rows"]], title)
    return {p: results[p]["rows"] for p in protocols}


def _build_setup(cfg, data, max_train, max_test, batch_size, causal: bool) -> _Setup:
    train = load_images(replace(data, max_images=max_train), "train")
    test = load_images(replace(data, max_images=max_test), "test")
    if train.labels is None or test.labels is None:
        raise ValueError(f"{data.root} has no labels (class sub-folders) to evaluate with")
    notes = [_subsample_note(len(train), len(test), max_train, max_test)]
    return _Setup(
        train=train,
        test=test,
        img_size=data.img_size,
        batch_size=batch_size,
        autocast_dtype=torch.bfloat16 if cfg.train.precision == "bf16" else None,
        causal=causal,
        device=torch.device("cuda" if torch.cuda.is_available() else "cpu"),
        notes="; ".join(notes + ["causal attention"] * causal),
    )


def _frozen_probes(protocols, models, setup: _Setup, layer, pool, k, epochs, pixels) -> dict:
    """kNN / linear rows: raw pixels once, then one row per model and tapped layer."""
    out: dict[str, dict] = {p: {"rows": []} for p in protocols}
    if pixels:
        f_train, f_test = (_pixels(setup.batches(s)) for s in (setup.train, setup.test))
        for p in protocols:
            res = _probe(p, f_train, f_test, setup, k, epochs[p])
            out[p]["rows"].append(_row("raw pixels", p, "pixels", res, setup.notes))
    for name, backbone in models:
        taps = list(tap_indices(backbone)) if layer == "all" else [layer]
        tic = time.perf_counter()
        f_train, f_test = _extract(setup, extract_layer_features, backbone, layers=taps, pool=pool)
        seconds = time.perf_counter() - tic
        log.info("%s: %d tap(s), features %s in %.1fs", name, len(taps), f_train[0].shape, seconds)
        for p in protocols:
            rows = []
            for i, tap in enumerate(taps):  # f_train[i]: (N, D) features of tap i
                res = _probe(p, f_train[i], f_test[i], setup, k, epochs[p])
                rows.append(_row(name, p, tap, res, setup.notes))
            if layer == "all":
                best = _mark_best(rows)
                if name == "pretrained":
                    out[p]["best_layer"] = best
            out[p]["rows"].extend(rows)
    return out


def _extract(setup: _Setup, extract, backbone: nn.Module, **kwargs) -> tuple[torch.Tensor, ...]:
    """``extract(...)`` features of the train and the test split (labels dropped)."""
    return tuple(
        extract(
            backbone,
            setup.batches(images),
            attn_mask=setup.attn_mask(backbone),
            device=setup.device,
            autocast_dtype=setup.autocast_dtype,
            progress=True,
            **kwargs,
        )[0]
        for images in (setup.train, setup.test)
    )


def _probe(protocol, f_train, f_test, setup: _Setup, k: int, epochs: int) -> dict:
    train, test = setup.train.labels, setup.test.labels
    if protocol == "knn":
        return knn_classify(f_train, train, f_test, test, k=k)
    return linear_probe(f_train, train, f_test, test, epochs=epochs)


def _attentive(models, setup: _Setup, blocks, epochs: int) -> dict:
    """Attentive-probe rows (no raw-pixel row: the probe needs tokens)."""
    rows = []
    for name, backbone in models:
        chosen = tuple(blocks) if blocks else default_blocks(backbone)
        train, test = _extract(setup, extract_block_tokens, backbone, blocks=chosen)  # (N, T, D)
        res = attentive_probe(
            train,
            setup.train.labels,
            test,
            setup.test.labels,
            num_heads=probe_heads(backbone),
            epochs=epochs,
            batch_size=setup.batch_size,
            device=setup.device,
        )
        where = "blocks " + ",".join(str(b) for b in chosen)
        notes = f"{setup.notes}; {res['params']:,} params"
        rows.append(_row(name, "attentive", where, res, notes) | {"blocks": list(chosen)})
    return {"rows": rows}


def _lora(models, setup: _Setup, rank: int, epochs: int) -> dict:
    """LoRA rows on a copy of each backbone (no raw-pixel row: LoRA needs a network)."""
    rows = []
    for name, backbone in models:
        res = lora_finetune(
            copy.deepcopy(backbone),
            setup.train,
            setup.test,
            img_size=setup.img_size,
            rank=rank,
            epochs=epochs,
            batch_size=setup.batch_size,
            attn_mask=setup.attn_mask(backbone),
            device=setup.device,
            autocast_dtype=setup.autocast_dtype,
        )
        log.info("%s LoRA: %s trainable of %s", name, res["trainable_params"], res["total_params"])
        notes = f"{setup.notes}; {res['trainable_params']:,} trainable / {res['total_params']:,}"
        rows.append(_row(name, "lora", None, res, notes))
    return {"rows": rows, "lora_rank": rank}


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


def _check(protocols: list[str], layer, attention: str) -> None:
    unknown = [p for p in protocols if p not in PROTOCOLS]
    if unknown or not protocols:
        raise ValueError(f"protocols must be among {PROTOCOLS}, got {protocols}")
    if attention not in ATTENTIONS:
        raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
    if not (layer is None or layer == "all" or isinstance(layer, int)):
        raise ValueError(f"layer must be a block index, 'all' or None, got {layer!r}")


def _subsample_note(n_train: int, n_test: int, max_train: int, max_test: int) -> str:
    parts = []
    if max_train:
        parts.append(f"first {n_train} train images")
    if max_test:
        parts.append(f"first {n_test} test images")
    return ", ".join(parts) or f"all {n_train} train / {n_test} test"
