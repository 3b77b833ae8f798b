"""``mimar eval``: frozen features of a run's backbone (and controls) -> kNN / linear probe.

The controls answer "what did pretraining buy?": raw pixels, and the very same backbone at
its random initialisation (same seed, so it is the network the run started from).
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path

import torch

from mimar.data import iterate_eval_batches, load_images
from mimar.evaluation.features import extract_features
from mimar.evaluation.knn import knn_classify
from mimar.evaluation.linear import linear_probe
from mimar.evaluation.report import print_results, write_json
from mimar.loading import load_backbone, load_run, random_init_backbone, resolve_checkpoint

log = logging.getLogger("mimar")


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
    layer: int | None = None,
    pool: str = "avg",
    data_root: str | None = None,
    max_train: int = 0,
    max_test: int = 0,
    baselines: bool = False,
    batch_size: int = 256,
    k: int = 20,
    epochs: int = 30,
) -> dict[str, list[dict]]:
    cfg, _ = load_run(checkpoint)
    data = cfg.data if data_root is None else replace(cfg.data, root=data_root)
    train = load_images(replace(data, max_images=max_train), "train")
    test = load_images(replace(data, max_images=max_test), "test")
    if train.labels is None or test.labels is None:
        raise ValueError(f"{data.root} has no labels (class sub-folders) to evaluate with")
    notes = _subsample_note(len(train.labels), len(test.labels), max_train, max_test)
    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else None
    models = [("pretrained", load_backbone(checkpoint))]
    if baselines:
        models = [("raw pixels", None), ("random init", random_init_backbone(cfg))] + models
    where = "final" if layer is None else f"block {layer}"
    results: dict[str, list[dict]] = {p: [] for p in protocols}
    for name, backbone in models:
        tic = time.perf_counter()
        f_train, f_test = (
            _features(backbone, s, data.img_size, batch_size, layer, pool, dtype)
            for s in (train, test)
        )
        log.info("%s features %s in %.1fs", name, tuple(f_train.shape), time.perf_counter() - tic)
        for protocol in protocols:
            if protocol == "knn":
                res = knn_classify(f_train, train.labels, f_test, test.labels, k=k)
            else:
                res = linear_probe(f_train, train.labels, f_test, test.labels, epochs=epochs)
            row = {
                "model": name,
                "protocol": protocol,
                "layer": "pixels" if backbone is None else where,
                "top1": res["top1"],
                "notes": notes,
                "details": res,
            }
            results[protocol].append(row)
    out = run_folder(checkpoint) / "eval"
    for protocol, rows in results.items():
        write_json(
            out / f"{protocol}.json",
            {
                "protocol": protocol,
                "checkpoint": str(checkpoint),
                "pool": pool,
                "layer": layer,
                "n_train": len(train.labels),
                "n_test": len(test.labels),
                "rows": rows,
            },
        )
    table = [r for p in protocols for r in results[p]]
    print_results(
        table, f"{cfg.method.name} {cfg.backbone.name}: frozen features, {data.name} test top-1 (%)"
    )
    return results


def _features(backbone, images, img_size, batch_size, layer, pool, dtype) -> torch.Tensor:
    batches = iterate_eval_batches(images, img_size, batch_size)
    if backbone is None:  # raw-pixel control: the normalised image as a vector
        return torch.cat([b.flatten(1) for b, _ in batches])
    feats, _ = extract_features(
        backbone, batches, layer=layer, pool=pool, autocast_dtype=dtype, progress=True
    )
    return feats


def _subsample_note(n_train: int, n_test: int, max_train: int, max_test: int) -> str:
    parts = []
    if max_train:
        parts.append(f"first {n_train} train images")
    if max_test:
        parts.append(f"first {n_test} test images")
    return ", ".join(parts) or f"all {n_train} train / {n_test} test"
