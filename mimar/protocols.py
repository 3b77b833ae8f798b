"""Every protocol of ``mimar eval``, one table: the frozen-backbone probes of
:mod:`mimar.evaluation` and, registered here above ``evaluation/``, ``finetune/`` and
``dense/``, the protocols that train a network:

* ``finetune``: end-to-end fine-tuning with layer decay (:func:`mimar.finetune.run.finetune`),
  its own run folder ``eval/finetune/``;
* ``segment`` / ``detect``: dense transfer (:func:`mimar.dense.run.dense_finetune`);
* ``robustness``: the fine-tuned classifier on ImageNet-C-style corrupted test sets.

Each entry declares its options dataclass (its fields are ``mimar eval`` flags) and the key
prefixes of the ``key=value`` overrides it takes. With ``--baselines`` every trained protocol
runs the same recipe from random initialisation first.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from mimar import runs
from mimar.data.eval_data import fitted_note, parse_data_spec
from mimar.data.image_set import UNKNOWN_LABEL, unknown_note
from mimar.errors import ConfigError, Stopped
from mimar.evaluation.frozen import FROZEN_TABLE, EvalProtocol, result_row
from mimar.evaluation.options import EvalRequest, build_request, option
from mimar.evaluation.runner import report, run_frozen


@dataclass(frozen=True, kw_only=True)
class FinetuneOptions:
    recipe: str | None = option(None, "finetune/segment/detect: recipe YAML (default: CPU recipe)")
    resume: bool = option(False, "finetune/segment/detect: continue an interrupted one")


@dataclass(frozen=True, kw_only=True)
class DenseOptions(FinetuneOptions):
    neck: Literal["pretrained", "scratch"] = option(
        "pretrained",
        "segment/detect with iTPN: its pretrained pyramid neck, or that neck re-initialised",
    )

    def __post_init__(self) -> None:
        if self.neck not in ("pretrained", "scratch"):
            raise ConfigError(f"neck must be pretrained or scratch, got {self.neck!r}")


@dataclass(frozen=True, kw_only=True)
class RobustnessOptions:
    """Robustness reads the fine-tuned classifier: nothing of its own to choose."""


def _rows_of(request: EvalRequest) -> tuple[bool, ...]:
    """The rows of a trained protocol: from scratch first (``--baselines``), then pretrained."""
    return (True, False) if request.run.baselines else (False,)


def _finetune(request: EvalRequest) -> dict:
    """End-to-end fine-tuning with layer decay: its own run folder per row."""
    from mimar.finetune.run import finetune  # the fine-tune engine, only when asked for

    opts, run, rows = request.options["finetune"], request.run, []
    for scratch in _rows_of(request):
        tic = time.perf_counter()
        res = finetune(
            run.checkpoint,
            recipe=opts.recipe,
            overrides=overrides_of(request, "finetune"),
            max_train=run.max_train,
            max_test=run.max_test,
            scratch=scratch,
            resume=opts.resume,
            data_spec=_data_spec(run.data_root),
            unknown_classes=run.unknown_classes,
            eval_out=run.out,
        )
        if res.get("stopped_by"):
            raise Stopped(res["stopped_by"], "fine-tuning")
        res["seconds"] = round(time.perf_counter() - tic, 1)
        notes = f"final epoch of {res.get('epochs')}"
        if res.get("best_top1") is not None:
            notes += f"; best {res['best_top1']:.2f} at epoch {res['best_epoch']:g}"
        notes += f"; {res.get('n_train')} train; {res['seconds'] / 60:.1f} min"
        if res.get("unknown_classes"):
            notes += f"; {unknown_note(res['unknown_classes'])}"
        name = "random init" if scratch else "pretrained"
        rows.append(result_row(name, "finetune", "all blocks", res, notes))
    return {"rows": rows}


DENSE_SCORES = ("miou", "pixel_accuracy", "ap", "ap50", "ap75")


def _dense(task: str):
    """Dense transfer: the pretrained backbone (``--neck scratch``: iTPN's trunk with a fresh
    neck) fine-tuned with a ``task`` head on the scene benchmark or ``--data``."""

    def run_task(request: EvalRequest) -> dict:
        from mimar.dense.run import HEADLINE, dense_finetune  # only when asked for

        opts, run = request.options[task], request.run
        headline, rows, out = HEADLINE[task], [], {}
        for scratch in _rows_of(request):
            res = dense_finetune(
                run.checkpoint,
                task,
                data=run.data_root,
                recipe=opts.recipe,
                overrides=overrides_of(request, task),
                max_train=run.max_train,
                max_test=run.max_test,
                scratch=scratch,
                neck=opts.neck,
                resume=opts.resume,
                eval_out=run.out,
            )
            if res.get("stopped_by"):
                raise Stopped(res["stopped_by"], task)
            scores = {k: v for k, v in res.items() if k in DENSE_SCORES}
            notes = ", ".join(f"{k} {v:.2f}" for k, v in scores.items() if v is not None)
            notes += f"; {res['n_train']} train / {res['n_test']} test at {res['img_size']} px"
            notes += f"; {res['epochs']} epochs; {res['seconds'] / 60:.1f} min"
            name = "random init" if scratch else "pretrained"
            if not scratch and opts.neck == "scratch":
                name = "pretrained, scratch neck"
            where = "all blocks + neck" if not scratch else "all"
            res_row = res | {"top1": res[headline]}
            rows.append(result_row(name, f"{task} ({headline})", where, res_row, notes))
            out |= {f"scratch_{k}" if scratch else k: v for k, v in scores.items()}
        return {"rows": rows, "neck": opts.neck, **out}

    return run_task


def _data_spec(value: str | None) -> str | None:
    """``--data`` for the fine-tune: ``KIND:PATH`` only (a plain path is the frozen protocols'
    root of the run's data set; the fine-tune reads its recipe's data, as before)."""
    return value if parse_data_spec(value) is not None else None


def _robustness(request: EvalRequest) -> dict:
    """The fine-tuned classifier (and with ``--baselines`` the from-scratch one) on
    ImageNet-C-style corrupted copies of its test set; writes robustness.png and
    corruptions.png beside the JSON."""
    from mimar.config import build_section
    from mimar.data import DataConfig, load_images
    from mimar.engine.precision import resolve_device
    from mimar.evaluation.corruptions import CORRUPTIONS
    from mimar.evaluation.robustness import evaluate_robustness
    from mimar.evaluation.robustness_plots import plot_corruptions, plot_robustness
    from mimar.finetune.run import load_finetuned, trained_precision

    run = request.run
    run_dir, device = runs.run_dir_of(run.checkpoint), resolve_device(run.device)
    rows, curves, test = [], [], None
    spec = parse_data_spec(run.data_root)  # the fine-tune's own test set unless KIND:PATH
    for scratch in _rows_of(request):
        classifier, ft_cfg = load_finetuned(run_dir, scratch, run.out)  # one line if missing
        data = build_section(DataConfig, ft_cfg["data"], "data")
        if spec is not None and test is None:  # KIND:PATH: another test set, as fine-tuned
            data = replace(data, name=spec[0], root=spec[1])
            print(fitted_note(data))
        if test is None:  # the fine-tune's own test split
            test = load_images(
                replace(data, max_images=run.max_test), "test", unknown_classes=run.unknown_classes
            )
            if run.unknown_classes == "wrong" and test.labels is not None:
                # classes past the fine-tune's (an image folder lists them after the train
                # split's) are scored as wrong, as the fine-tune scored them
                known = test.labels < int(ft_cfg["num_classes"])
                test = replace(test, labels=test.labels.where(known, UNKNOWN_LABEL))
        res = evaluate_robustness(
            _in_precision(classifier.to(device).logits, device, trained_precision(ft_cfg)),
            test,
            img_size=data.img_size,
            batch_size=run.batch_size,
            device=device,
        )
        name = "random init" if scratch else "pretrained"
        notes = f"{len(test)} test images; clean {res['clean_top1']:.2f}; "
        notes += f"{len(CORRUPTIONS)} corruptions x 5 severities"
        res_row = res | {"top1": res["mean_corruption_top1"]}
        rows.append(result_row(name, "robustness", "mean corruption", res_row, notes))
        curves.append((f"{name} fine-tune", res))
    out = runs.eval_folder(run_dir, run.out)
    plot_robustness(curves, out / "robustness.png")
    plot_corruptions(test.images[0], out / "corruptions.png")
    return {"rows": rows, "n_test": len(test)}


def _in_precision(logits, device, precision: str):
    """``logits`` under the autocast of ``precision``, as the fine-tune evaluated its test set,
    so that the clean row equals its final top-1. In bf16 `mimar eval finetune robustness
    --max-train 1280 --max-test 500 --baselines` took 62 s instead of 124 s in fp32 here."""
    from mimar.engine.precision import autocast, autocast_dtype

    def classify(images):
        with autocast(device, autocast_dtype(precision)):
            return logits(images)

    return classify


TRAINED_TABLE: dict[str, EvalProtocol] = {
    "finetune": EvalProtocol(
        None,
        "end-to-end fine-tuning with layer decay (--recipe, finetune.* keys)",
        FinetuneOptions,
        overrides=("finetune.", "data."),
        alone=_finetune,
    ),
    "robustness": EvalProtocol(
        None,
        "the fine-tuned classifier on corrupted test sets",
        RobustnessOptions,
        alone=_robustness,
    ),
    "segment": EvalProtocol(
        None,
        "semantic segmentation (UPerNet) on the scenes or --data: mIoU",
        DenseOptions,
        overrides=("dense.",),
        alone=_dense("segment"),
    ),
    "detect": EvalProtocol(
        None,
        "detection (Faster R-CNN) on the scenes or --data: box AP",
        DenseOptions,
        overrides=("dense.",),
        alone=_dense("detect"),
    ),
}
PROTOCOL_TABLE: dict[str, EvalProtocol] = FROZEN_TABLE | TRAINED_TABLE
PROTOCOLS: tuple[str, ...] = tuple(PROTOCOL_TABLE)


def request(protocols: Iterable[str], overrides: Iterable[str] = (), **values: Any) -> EvalRequest:
    """An :class:`EvalRequest` from flat options by field name (as ``mimar eval`` parses
    them), e.g. ``request(["knn", "finetune"], checkpoint=run, k=10, recipe="r.yaml")``."""
    declared = {name: spec.options for name, spec in PROTOCOL_TABLE.items()}
    made = build_request(declared, protocols, values, overrides)
    _check_overrides(made)
    return made


def option_classes() -> list[type]:
    """The options dataclasses whose fields are ``mimar eval``'s flags, shared ones first."""
    from mimar.evaluation.options import RunOptions

    seen: list[type] = [RunOptions]
    for spec in PROTOCOL_TABLE.values():
        if spec.options not in seen:
            seen.append(spec.options)
    return seen


def overriding() -> dict[str, tuple[str, ...]]:
    """The protocols that take ``key=value`` overrides, and their key prefixes."""
    return {name: spec.overrides for name, spec in PROTOCOL_TABLE.items() if spec.overrides}


def overrides_of(request: EvalRequest, protocol: str) -> tuple[str, ...]:
    """The overrides ``protocol`` takes: all of them when the requested protocols that take
    overrides share one recipe kind (a misspelt key then fails loudly in that recipe), else
    those with one of its key prefixes."""
    takers = {PROTOCOL_TABLE[p].overrides for p in request.protocols}
    if len(takers - {()}) == 1:  # one recipe kind (finetune, or segment and detect)
        return request.overrides
    prefixes = PROTOCOL_TABLE[protocol].overrides
    return tuple(o for o in request.overrides if o.startswith(prefixes))


def _check_overrides(made: EvalRequest) -> None:
    if not made.overrides:
        return
    takers = {p: PROTOCOL_TABLE[p].overrides for p in made.protocols if PROTOCOL_TABLE[p].overrides}
    if not takers:
        names = ", ".join(overriding())
        raise ConfigError(f"overrides {list(made.overrides)} apply to the {names} protocols")
    if len(set(takers.values())) > 1:  # several recipes: each word must name whose it is
        prefixes = sorted({p for ps in takers.values() for p in ps})
        stray = [o for o in made.overrides if not o.startswith(tuple(prefixes))]
        if stray:
            raise ConfigError(f"overrides {stray} start with none of {prefixes}")


def evaluate(made: EvalRequest) -> dict[str, list[dict]]:
    """Run every protocol of ``made`` in its order (the frozen ones share one load of the
    backbone and the data), print one table, write ``eval/<protocol>.json`` each."""
    frozen = [p for p in made.protocols if p in FROZEN_TABLE]
    results, header, title = {}, {}, f"{Path(made.run.checkpoint).name}: test top-1 (%)"
    if frozen:
        results, header, title = run_frozen(made, frozen)
    for p in made.protocols:
        if PROTOCOL_TABLE[p].alone is not None:  # fine-tuning and robustness load their own
            results[p] = PROTOCOL_TABLE[p].alone(made)
    return report(made, PROTOCOL_TABLE, results, header, title)
