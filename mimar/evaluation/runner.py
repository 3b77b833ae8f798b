"""``mimar eval``: a run's backbone (and controls) -> the protocols of :mod:`.protocols`.

:func:`evaluate` loads the run, the data and the models once, runs every protocol through
the protocol table, prints one table and writes ``RUN_DIR/eval/<protocol>.json`` each.

* ``attention="causal"``: every protocol (LoRA training included) replaces full attention by
  a causal mask over the whole token sequence, prefix tokens first, patches in the order the
  model was pretrained to read them (AIM's ``method.order``; raster for every other method),
  as AIM Table 3d compares. The mask stays in the backbone's raster token layout.
* The random-init control is the very same backbone at its initialisation (same seed, so it is
  the network the run started from).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from mimar import runs
from mimar.config import PretrainConfig
from mimar.data import load_images
from mimar.data.image_set import check_same_classes
from mimar.errors import DataError
from mimar.evaluation.config import EvalConfig
from mimar.evaluation.precision import autocast_dtype, resolve_device
from mimar.evaluation.protocols import PROTOCOL_TABLE, EvalSetup, pooled_probes
from mimar.evaluation.report import print_results, write_json
from mimar.loading import load_run_backbone, random_init_backbone, resolve_checkpoint


def run_folder(checkpoint: str | Path) -> Path:
    """Where ``eval/`` goes: the run folder itself, or the one a checkpoint file sits in."""
    path = Path(checkpoint)
    if path.is_dir():
        return path
    return runs.run_of_checkpoint(resolve_checkpoint(path))


def results_folder(cfg: EvalConfig) -> Path:
    """``--out``, else ``RUN_DIR/eval``: where results and the feature cache go."""
    return Path(cfg.out) if cfg.out else run_folder(cfg.checkpoint) / runs.EVAL


def evaluate(cfg: EvalConfig) -> dict[str, list[dict]]:
    """Run ``cfg.protocols``, print one table, write ``RUN_DIR/eval/<protocol>.json`` each.

    Returns the rows per protocol.
    """
    specs = {p: PROTOCOL_TABLE[p] for p in cfg.protocols}
    title = f"{Path(cfg.checkpoint).name}: test top-1 (%)"
    results: dict[str, dict] = {}
    header = {"checkpoint": str(cfg.checkpoint), "pool": cfg.pool, "layer": cfg.layer}
    header["attention"] = cfg.attention
    if any(spec.alone is None for spec in specs.values()):  # frozen-backbone protocols
        run_cfg, pretrained = load_run_backbone(cfg.checkpoint)  # the checkpoint is read once
        title = f"{run_cfg.method.name} {run_cfg.backbone.name}: {run_cfg.data.name} test top-1 (%)"
        setup = build_setup(run_cfg, cfg)
        models = [("pretrained", pretrained)]
        if cfg.baselines:
            models.insert(0, ("random init", random_init_backbone(run_cfg)))
        models = [(name, backbone.to(setup.device)) for name, backbone in models]
        pooled = [p for p, spec in specs.items() if spec.probe is not None]
        results |= pooled_probes(pooled, models, setup, cfg) if pooled else {}
        for p, spec in specs.items():
            if spec.run is not None:
                results[p] = spec.run(models, setup, cfg, spec.epochs(cfg.epochs))
        header |= {"n_train": len(setup.train), "n_test": len(setup.test)}
        header["classes"] = setup.train.classes  # the one label mapping every split used
        title += f", {_class_count(setup.train)} classes"
    for p, spec in specs.items():
        if spec.alone is not None:  # fine-tuning and robustness load what they need
            results[p] = spec.alone(cfg)

    # Printed first: a results file that cannot be written (full disk, read-only run) must not
    # take the computed numbers with it.
    print_results([r for p in cfg.protocols for r in results[p]["rows"]], title)
    for p, spec in specs.items():
        payload = {"protocol": p, **header, "epochs": spec.epochs(cfg.epochs)}
        write_json(results_folder(cfg) / f"{p}.json", payload | results[p])
    return {p: results[p]["rows"] for p in cfg.protocols}


def build_setup(run_cfg: PretrainConfig, cfg: EvalConfig) -> EvalSetup:
    """The data (``cfg.data_root`` or the run's), device, precision and attention of a run."""
    data = run_cfg.data if cfg.data_root is None else replace(run_cfg.data, root=cfg.data_root)
    train = load_images(replace(data, max_images=cfg.max_train), "train")
    test = load_images(replace(data, max_images=cfg.max_test), "test")
    if train.labels is None or test.labels is None:
        raise DataError(f"{data.root} has no labels (class sub-folders) to evaluate with")
    check_same_classes(train.classes, test.classes, str(data.root))
    causal = cfg.attention == "causal"
    notes = [_subsample_note(len(train), len(test), cfg.max_train, cfg.max_test)]
    return EvalSetup(
        train=train,
        test=test,
        img_size=data.img_size,
        batch_size=cfg.batch_size,
        autocast_dtype=autocast_dtype(run_cfg.train.precision),  # as the run was trained
        device=resolve_device(cfg.device),
        causal=causal,
        # Only AIM reads its patches in a configurable order; every other method is raster.
        # Sniffing the method config here keeps evaluation free of method imports.
        order=getattr(run_cfg.method, "order", "raster"),
        order_seed=getattr(run_cfg.method, "order_seed", 0),
        notes="; ".join(notes + ["causal attention"] * causal),
        cache=results_folder(cfg) / "features" if cfg.feature_cache else None,
    )


def _class_count(images) -> int:
    return len(images.classes) if images.classes else int(images.labels.max()) + 1


def _subsample_note(n_train: int, n_test: int, max_train: int, max_test: int) -> str:
    parts = []
    if max_train:
        parts.append(f"first {n_train} train images")
    if max_test:
        parts.append(f"first {n_test} test images")
    return ", ".join(parts) or f"all {n_train} train / {n_test} test"
