"""The frozen-backbone protocols of a request: a run's (or an export's) backbone and its
controls -> the protocols of :mod:`.frozen`; and the one way every protocol's results are
printed and written (``RUN_DIR/eval/<protocol>.json``).

* ``attention="causal"``: every frozen protocol (LoRA training included) replaces full
  attention by a causal mask over the whole token sequence, prefix tokens first, patches in the
  order the model was pretrained to read them (AIM's ``method.order``; raster for every other
  method), as AIM Table 3d compares. The mask stays in the backbone's raster token layout.
* The random-init control is the very same backbone at its initialisation (same seed, so it is
  the network the run started from; an export, which keeps no seed: seed 0).
* ``--data KIND:PATH`` (:mod:`mimar.data.eval_data`) evaluates on other images, fitted to the
  backbone's size, channels and the run's statistics; a plain ``--data PATH`` is the run's
  data set at that root.
* An exported ``.safetensors`` carries no data section: its data defaults to Fashion-MNIST at
  the backbone's size, in fp32 (``--data`` names other images), as ``eval finetune`` reads it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from mimar import runs
from mimar.data import DataConfig, load_images
from mimar.data.eval_data import data_for_backbone, parse_data_spec
from mimar.data.image_set import align_classes, unknown_note
from mimar.engine.precision import autocast_dtype, resolve_device
from mimar.errors import DataError
from mimar.evaluation.frozen import FROZEN_TABLE, EvalProtocol, EvalSetup, pooled_probes
from mimar.evaluation.options import EvalRequest
from mimar.evaluation.report import print_results, write_json

EXPORTED = ".safetensors"


def eval_dir(checkpoint: str | Path, out: str | Path | None = None) -> Path:
    """Where results go: ``out`` (``--out``: a read-only run can be evaluated), else ``eval/``
    of the run a checkpoint belongs to (:func:`runs.run_dir_of`), or ``eval/`` beside an
    exported file."""
    return runs.eval_folder(checkpoint, out)


@dataclass(frozen=True)
class Source:
    """What the frozen protocols need to know of what they evaluate."""

    title: str  # the table's title up to the data set's name
    data: DataConfig  # the images (the run's own, or an export's defaults)
    precision: str  # train.precision the backbone was trained in: the features' autocast
    order: str  # the model's patch order (masking.patch_order kinds): what causal follows
    order_seed: int
    pretrained: nn.Module
    random_init: Callable[[], nn.Module]  # the control: the backbone as it was initialised


def run_source(run_cfg, pretrained: nn.Module) -> Source:
    """A pretraining run's backbone: its data, precision and patch order."""
    from mimar.loading import random_init_backbone

    return Source(
        title=f"{run_cfg.method.name} {run_cfg.backbone.name}",
        data=run_cfg.data,
        precision=run_cfg.train.precision,
        # Only AIM reads its patches in a configurable order; every other method is raster.
        # Sniffing the method config here keeps evaluation free of method imports.
        order=getattr(run_cfg.method, "order", "raster"),
        order_seed=getattr(run_cfg.method, "order_seed", 0),
        pretrained=pretrained,
        random_init=lambda: random_init_backbone(run_cfg),
    )


def load_source(checkpoint: str | Path) -> Source:
    """A run folder, a checkpoint (``.pt`` or ``.dcp/``) or a ``mimar export`` file."""
    from mimar.backbones import build_backbone
    from mimar.loading import load_backbone, load_run_backbone

    path = Path(checkpoint)
    if path.suffix != EXPORTED:
        return run_source(*load_run_backbone(path))  # the checkpoint is read once
    backbone = load_backbone(path)
    c = backbone.cfg

    def random_init() -> nn.Module:
        torch.manual_seed(0)
        return build_backbone(c).eval()

    data = DataConfig(img_size=c.img_size, in_chans=c.in_chans)
    return Source(path.name, data, "fp32", "raster", 0, backbone, random_init)


def run_frozen(request: EvalRequest, protocols: list[str]) -> tuple[dict, dict, str]:
    """Run the frozen ``protocols`` of ``request`` on the source's backbone and controls.

    Returns (results per protocol, JSON header fields, table title).
    """
    source = load_source(request.run.checkpoint)
    setup = build_setup(source, request)
    models = [("pretrained", source.pretrained)]
    if request.run.baselines:
        models.insert(0, ("random init", source.random_init()))
    models = [(name, backbone.to(setup.device)) for name, backbone in models]
    specs = {p: FROZEN_TABLE[p] for p in protocols}
    pooled = [p for p, spec in specs.items() if spec.probe is not None]
    results = pooled_probes(pooled, models, setup, request, request.run.baselines) if pooled else {}
    for p, spec in specs.items():
        if spec.run is not None:
            opts = request.options[p]
            results[p] = spec.run(models, setup, opts, spec.epochs(opts.epochs))
    header = {"n_train": len(setup.train), "n_test": len(setup.test)}
    header["classes"] = setup.train.classes  # the one label mapping every split used
    if setup.unknown is not None:  # --unknown-classes wrong: what was scored wrong
        header["unknown_classes"] = setup.unknown
    spec = parse_data_spec(request.run.data_root)
    data_name = source.data.name if spec is None else spec[0]  # the images evaluated on
    title = f"{source.title}: {data_name} test top-1 (%)"
    return results, header, f"{title}, {_class_count(setup.train)} classes"


def report(
    request: EvalRequest,
    table: dict[str, EvalProtocol],
    results: dict[str, dict],
    header: dict,
    title: str,
) -> dict[str, list[dict]]:
    """Print one table of every protocol's rows, then write ``eval/<protocol>.json`` each
    (printed first: a failing write loses no result). Returns the rows per protocol."""
    print_results([r for p in request.protocols for r in results[p]["rows"]], title)
    out = eval_dir(request.run.checkpoint, request.run.out)
    for p in request.protocols:
        opts = request.options[p]
        payload = {"protocol": p, "checkpoint": str(request.run.checkpoint)}
        payload |= {"pool": getattr(opts, "pool", "avg"), "layer": getattr(opts, "layer", None)}
        payload |= {"attention": getattr(opts, "attention", "bidirectional"), **header}
        payload["epochs"] = table[p].epochs(getattr(opts, "epochs", None))
        write_json(out / f"{p}.json", payload | results[p])
    return {p: results[p]["rows"] for p in request.protocols}


def evaluate(request: EvalRequest) -> dict[str, list[dict]]:
    """Run a request of frozen protocols only (:func:`mimar.protocols.evaluate` runs every
    kind), print one table, write ``eval/<protocol>.json`` each; returns the rows."""
    results, header, title = run_frozen(request, list(request.protocols))
    return report(request, FROZEN_TABLE, results, header, title)


def build_setup(source: Source, request: EvalRequest) -> EvalSetup:
    """The data (``--data`` or the source's), device, precision and attention."""
    run = request.run
    data = source.data
    spec = parse_data_spec(run.data_root)
    if spec is not None:  # KIND:PATH: other images, fitted to the backbone
        data, note = data_for_backbone(source.data, *spec)
        print(note)
    elif run.data_root is not None:  # a plain path: the run's data set at another root
        data = replace(source.data, root=run.data_root)
    unknown_classes = run.unknown_classes
    train = load_images(replace(data, max_images=run.max_train), "train")
    test = load_images(
        replace(data, max_images=run.max_test), "test", unknown_classes=unknown_classes
    )
    if train.labels is None or test.labels is None:
        raise DataError(f"{data.root} has no labels (class sub-folders) to evaluate with")
    test, unknown = align_classes(train, test, str(data.root), unknown_classes)
    # the frozen protocols of one request share the attention option (one flag)
    attentions = {request.options[p].attention for p in request.protocols if p in FROZEN_TABLE}
    causal = attentions == {"causal"}
    pooled = [p for p in request.protocols if FROZEN_TABLE.get(p) and FROZEN_TABLE[p].probe]
    cache = bool(pooled) and request.options[pooled[0]].feature_cache
    notes = [_subsample_note(len(train), len(test), run.max_train, run.max_test)]
    notes += [unknown_note(unknown)] * bool(unknown)
    out = eval_dir(run.checkpoint, run.out)
    return EvalSetup(
        train=train,
        test=test,
        img_size=data.img_size,
        batch_size=run.batch_size,
        autocast_dtype=autocast_dtype(source.precision),  # as the backbone was trained
        device=resolve_device(run.device),
        causal=causal,
        order=source.order,
        order_seed=source.order_seed,
        notes="; ".join(notes + ["causal attention"] * causal),
        out=out,
        cache=out / "features" if cache else None,
        unknown=unknown if unknown_classes == "wrong" else None,
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
