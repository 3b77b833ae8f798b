"""What ``mimar eval`` takes: the options every protocol shares and one small dataclass per
protocol, each checked where it is declared.

Each field is a command-line option: the CLI generates ``--field-name`` (or the field's
``flag``) with the field's type, default and ``help`` from these declarations
(:func:`mimar.cli.common.add_options`), so a protocol's options are written here once. A
field several protocols declare (``epochs``, ``attention``, ...) is one option, the same
value for each of them.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from mimar.errors import ConfigError
from mimar.evaluation.features import POOLS, Pool

Attention = Literal["bidirectional", "causal"]
ATTENTIONS: tuple[str, ...] = ("bidirectional", "causal")

log = logging.getLogger("mimar")


def option(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    flag: str | None = None,
    parse: Callable[[str], Any] | None = None,
    metavar: str | None = None,
) -> Any:
    """A dataclass field that is also a command-line option.

    ``flag``: its spelling when not ``--field-name`` (a bool that defaults to True is given
    as ``--no-field-name`` unless ``flag`` says otherwise); ``parse``: str -> value for a type
    the CLI cannot read from the annotation (``--layer 3`` / ``--layer all``).
    """
    meta = {"help": help, "flag": flag, "parse": parse, "metavar": metavar}
    return field(default=default, metadata=meta)


def parse_layer(value: str) -> int | str:
    """``--layer``: a block index, or ``all``."""
    if value == "all":
        return value
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"expected a block index or 'all', got {value!r}") from None


def parse_int_list(value: str) -> tuple[int, ...]:
    """``--blocks 0,1,2``."""
    try:
        return tuple(int(v) for v in value.split(","))
    except ValueError:
        raise ValueError(f"expected comma-separated ints, got {value!r}") from None


@dataclass(frozen=True, kw_only=True)
class RunOptions:
    """What every protocol reads: the backbone, the data, where and how big."""

    checkpoint: str | Path = option(
        help="run folder, checkpoint (.pt or FSDP .dcp folder) or a `mimar export` "
        ".safetensors; results go to the run's eval/ (an export's: eval/ beside it)"
    )
    data_root: str | None = option(
        None,
        "KIND:PATH (image_folder:DIR, fashion_mnist:DIR, webdataset:PATTERN): evaluate on "
        "those images at the backbone's size and channels; a plain PATH: the run's data set "
        "at that root (default: the run's data); segment/detect: a COCO-format folder "
        "(or coco-format:FOLDER), default data/fmnist-scenes",
        flag="--data",
    )
    max_train: int = option(0, "subsample the train split (0=all)")
    max_test: int = option(0, "subsample the test split (0=all)")
    baselines: bool = option(
        False, "also evaluate raw pixels and the randomly initialised backbone"
    )
    batch_size: int = option(256, "feature extraction and every trained protocol")
    device: str = option(
        "auto", "where features and probes run: auto (cuda if available, else cpu), cpu, cuda, ..."
    )
    out: str | None = option(
        None, "the results folder, fine-tunes included (default RUN_DIR/eval; a read-only run)"
    )
    unknown_classes: Literal["error", "wrong"] = option(
        "error",
        "a test class that training lacks: refuse it, naming it (error), or score its images "
        "as wrong in every top-1 (of all test images) and count them in the notes (wrong)",
    )

    def __post_init__(self) -> None:
        for name in ("max_train", "max_test"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0 (0 = all), got {getattr(self, name)!r}")
        _positive(self, "batch_size")
        if self.unknown_classes not in ("error", "wrong"):
            raise ConfigError(
                f"unknown_classes must be error or wrong, got {self.unknown_classes!r}"
            )
        if self.device != "auto":
            try:
                torch.device(self.device)
            except (RuntimeError, TypeError):
                raise ConfigError(
                    f"device must be 'auto' or a torch device (cpu, cuda, cuda:1), "
                    f"got {self.device!r}"
                ) from None


@dataclass(frozen=True, kw_only=True)
class FrozenOptions:
    """Every protocol on the frozen backbone reads its tokens under one attention pattern."""

    attention: Attention = option(
        "bidirectional",
        "causal: a token sees itself and the tokens read before it, patches in the model's "
        "own order (AIM's method.order, else raster; AIM Tab. 3d)",
    )

    def __post_init__(self) -> None:
        if self.attention not in ATTENTIONS:
            raise ConfigError(f"attention must be one of {ATTENTIONS}, got {self.attention!r}")


@dataclass(frozen=True, kw_only=True)
class PooledOptions(FrozenOptions):
    """kNN and the linear probe score pooled features of one tap (or every block)."""

    layer: int | Literal["all"] | None = option(
        None,
        "kNN/linear: block index, or 'all' (one row per block, best marked); "
        "default: final normed tokens",
        parse=parse_layer,
    )
    pool: Pool = option("avg", "kNN/linear: mean of the patch tokens, or the class token")
    feature_cache: bool = option(
        True, "knn/linear: extract again instead of reusing RUN_DIR/eval/features/"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (self.layer is None or self.layer == "all" or _is_int(self.layer)):
            raise ConfigError(f"layer must be a block index, 'all' or None, got {self.layer!r}")
        if self.pool not in POOLS:
            raise ConfigError(f"pool must be one of {POOLS}, got {self.pool!r}")


EPOCHS_HELP = "training epochs of every trained protocol"


@dataclass(frozen=True, kw_only=True)
class KnnOptions(PooledOptions):
    k: int = option(20, "kNN neighbours")

    def __post_init__(self) -> None:
        super().__post_init__()
        _positive(self, "k")


@dataclass(frozen=True, kw_only=True)
class LinearOptions(PooledOptions):
    epochs: int | None = option(None, EPOCHS_HELP)

    def __post_init__(self) -> None:
        super().__post_init__()
        _epochs(self.epochs)


@dataclass(frozen=True, kw_only=True)
class AttentiveOptions(FrozenOptions):
    blocks: tuple[int, ...] | None = option(
        None,
        "attentive probe: comma list of blocks whose raw outputs are averaged "
        "(default: the last 3)",
        parse=parse_int_list,
    )
    classifier_bias: bool = option(
        False,
        "attentive probe: give the classifier a bias (as an earlier ml-aim; "
        "default: none, as ml-aim now)",
        flag="--probe-bias",
    )
    epochs: int | None = option(None, EPOCHS_HELP)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.blocks is not None:
            object.__setattr__(self, "blocks", tuple(self.blocks))
            if not (self.blocks and all(map(_is_int, self.blocks))):
                raise ConfigError(
                    f"blocks must be a non-empty list of block indices, got {self.blocks}"
                )
        _epochs(self.epochs)


@dataclass(frozen=True, kw_only=True)
class LoraOptions(FrozenOptions):
    lora_rank: int = option(8, "LoRA rank (alpha 16)")
    epochs: int | None = option(None, EPOCHS_HELP)

    def __post_init__(self) -> None:
        super().__post_init__()
        _positive(self, "lora_rank")
        _epochs(self.epochs)


@dataclass(frozen=True)
class EvalRequest:
    """One ``mimar eval`` call: the protocols in order, what they share, and each one's own
    options (``options[protocol]``, an instance of its declared dataclass)."""

    protocols: tuple[str, ...]
    run: RunOptions
    options: Mapping[str, Any]
    overrides: tuple[str, ...] = ()  # key=value words for the protocols that take them


def build_request(
    declared: Mapping[str, type],
    protocols: Iterable[str],
    values: Mapping[str, Any],
    overrides: Iterable[str] = (),
) -> EvalRequest:
    """An :class:`EvalRequest` from flat option ``values`` (as the CLI parses them, by field
    name): each protocol takes the fields its dataclass (``declared[protocol]``) declares.

    A name no protocol declares is an error; a value no *requested* protocol reads is ignored
    with a warning when it differs from its default (the CLI hands over every option).
    """
    protocols = tuple(protocols)
    unknown = [p for p in protocols if p not in declared]
    if unknown or not protocols:
        raise ConfigError(f"protocols must be among {tuple(declared)}, got {list(protocols)}")
    if len(set(protocols)) < len(protocols):
        raise ConfigError(f"protocols must be distinct, got {list(protocols)}")
    classes = [RunOptions, *(declared[p] for p in protocols)]
    taken = {f.name for cls in classes for f in dataclasses.fields(cls)}
    every = {f.name: f for cls in (RunOptions, *declared.values()) for f in dataclasses.fields(cls)}
    for name, value in values.items():
        if name in taken:
            continue
        if name not in every:
            raise ConfigError(f"unknown evaluation option {name!r}")
        if value != every[name].default:  # as before options were declared: not an error
            log.warning("%s applies to none of the protocols %s: ignored", name, list(protocols))

    def make(cls: type) -> Any:
        return cls(**{f.name: values[f.name] for f in dataclasses.fields(cls) if f.name in values})

    run = make(RunOptions)
    options = {p: make(declared[p]) for p in protocols}
    knn = options.get("knn")
    if knn is not None and run.max_train and knn.k > run.max_train:
        raise ConfigError(
            f"k={knn.k} neighbours but max_train={run.max_train} train images: "
            "lower --k or raise --max-train"
        )
    return EvalRequest(protocols, run, options, tuple(overrides))


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive(options: object, name: str) -> None:
    value = getattr(options, name)
    if not _is_int(value) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def _epochs(value: object) -> None:
    if value is not None and not (_is_int(value) and value >= 1):
        raise ConfigError(f"epochs must be a positive integer or None, got {value!r}")
