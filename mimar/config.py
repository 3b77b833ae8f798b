"""Typed configuration: frozen dataclasses, YAML recipes and dotted command-line overrides.

A recipe maps 1:1 onto :class:`PretrainConfig`. Unknown keys and wrongly typed values are
errors that name the key, the expected type and close matches. A recipe may name one
``base:`` recipe (path relative to itself) whose values it overrides; no other logic.
``method`` and ``backbone`` sections pick their dataclass by their ``name`` key, looked up in
``mimar.names`` (which imports only the module that name needs).

Why one file of ~430 lines: the training sections (data, optim, train) and the one generic
builder from YAML to typed dataclasses (coercion, unknown keys, overrides, diffs) are read
together; method and backbone sections live with their modules, fine-tune / dense sections in
``mimar/downstream/``.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from mimar import names, recipe_yaml, writes
from mimar.data import DataConfig
from mimar.errors import ConfigError, check_range, clip
from mimar.teachers.config import TeacherConfig

# A section's dataclass is picked at run time by its ``name`` through mimar.names (which imports
# only the module that name needs); no union of every method here, so that adding a method
# touches no file but its own and its names.METHODS line.
MethodConfig = BackboneConfig = Any

__all__ = [
    "ConfigError",
    "PretrainConfig",
    "check_range",
    "from_dict",
    "load_config",
    "section_from_dict",
]


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    lr: float | None = None  # absolute peak lr; None -> base_lr * global batch / base_batch_size
    base_lr: float = 1e-4  # SimMIM: lrs are per 512 images and scaled linearly (§2.5)
    base_batch_size: int = 512
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.05
    # Backbone parameters that DO get weight decay although the backbone exempts them (its
    # no_weight_decay(): class/mask tokens, position tables): fnmatch patterns on names
    # relative to method.backbone. The official codes differ (docs/METHODS.md §2.5, §4.5, §6.7):
    # SimMIM-ViT and EVA decay the mask token, SimMIM-Swin its relative-position tables,
    # iTPN-pixel its position table, D-iGPT its class token; each recipe says which.
    weight_decay_on: tuple[str, ...] = ()
    warmup_steps: int | None = None  # None -> warmup_fraction of train.steps
    warmup_fraction: float = 0.05
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of the peak lr
    clip_grad: float | None = 5.0  # SimMIM §2.5; None or 0 disables clipping
    layer_decay: float = 1.0  # fine-tuning: lr scale decay^(L + 1 - layer_id) (METHODS §1.5)
    # AdamW kernel: auto = PyTorch's default (for-loop on CPU, foreach on CUDA); fused measured
    # 3.1x faster per update than for-loop for the tiny ViT here (python -m benchmarks.adamw)
    implementation: Literal["auto", "for-loop", "foreach", "fused"] = "auto"

    def __post_init__(self) -> None:
        # Out-of-range values fail here, naming the key: a negative clip_grad would otherwise
        # scale every gradient by a negative factor (gradient ascent), silently.
        if self.lr is not None:
            check_range("optim.lr", self.lr, self.lr > 0, "> 0 (or null: scaled base_lr)")
        check_range("optim.base_lr", self.base_lr, self.base_lr > 0, "> 0")
        check_range(
            "optim.base_batch_size", self.base_batch_size, self.base_batch_size >= 1, ">= 1"
        )
        for i, beta in enumerate(self.betas):
            check_range(f"optim.betas[{i}]", beta, 0 <= beta < 1, "in [0, 1)")
        check_range("optim.eps", self.eps, self.eps >= 0, ">= 0")
        check_range("optim.weight_decay", self.weight_decay, self.weight_decay >= 0, ">= 0")
        if self.warmup_steps is not None:
            check_range("optim.warmup_steps", self.warmup_steps, self.warmup_steps >= 0, ">= 0")
        fraction = self.warmup_fraction
        check_range("optim.warmup_fraction", fraction, 0 <= fraction <= 1, "in [0, 1]")
        check_range(
            "optim.min_lr_ratio", self.min_lr_ratio, 0 <= self.min_lr_ratio <= 1, "in [0, 1]"
        )
        if self.clip_grad is not None:
            clip = self.clip_grad
            check_range("optim.clip_grad", clip, clip >= 0, ">= 0 (null or 0 disables clipping)")
        decay = self.layer_decay  # a scale decay^(L + 1 - layer_id) > 1 is no decay
        check_range("optim.layer_decay", decay, 0 < decay <= 1, "in (0, 1]")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    steps: int = 1000  # optimizer steps
    log_every: int = 1
    checkpoint_every: int = 500  # periodic checkpoints/step_XXXXXXX.pt; last.pt is always kept
    accum_steps: int = 1  # gradient accumulation: micro-batches of data.batch_size per step
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16 = autocast (also on CPU)
    # ddp: every rank holds the whole model (checkpoints/last.pt); fsdp: FSDP2 shards it over
    # the ranks, checkpoints are DCP folders (checkpoints/last.dcp/) that reshard on load.
    strategy: Literal["ddp", "fsdp"] = "ddp"
    # auto: matmul attention for CPU bf16 training, SDPA elsewhere (mimar/nn/attention.py)
    attention_kernel: Literal["auto", "sdpa", "matmul"] = "auto"
    grad_checkpointing: bool = False  # recompute block activations in backward (less memory)
    compile: bool = False  # torch.compile the model's step (the first step logs its compile time)
    seed: int = 0
    device: str = "auto"  # auto -> cuda when available (the local rank's GPU), else cpu
    threads: int = 0  # torch CPU threads; 0 leaves PyTorch's default
    progress: bool = True  # rich progress bar (rank 0, interactive terminals)
    # Where metrics go besides metrics.jsonl (always written: resume and mimar bench read it):
    # tensorboard (RUN/tensorboard/), wandb (offline unless wandb is configured); extras.
    loggers: tuple[str, ...] = ("jsonl",)
    picture_every: int = 0  # also draw (and log) the run's picture every this many steps
    init: str = ""  # start from these weights: a run, checkpoint or release (mimar.formats.init)
    # The online monitor (mimar/monitor/): every monitor_every steps and at the last one, the
    # backbone's features of a fixed subset (monitor_bank train + monitor_queries test images,
    # drawn once by a fixed seed) give a kNN top-1 and RankMe; 0 = off.
    monitor_every: int = 0
    monitor: tuple[str, ...] = ("knn", "rankme")  # which probes: knn, rankme
    monitor_bank: int = 5000  # train images: the kNN memory bank and the health metrics
    monitor_queries: int = 1000  # test images the kNN classifies

    def __post_init__(self) -> None:
        check_loggers(self.loggers, "train")
        check_monitor(self)
        for key in ("steps", "log_every", "accum_steps"):
            check_range(f"train.{key}", getattr(self, key), getattr(self, key) >= 1, ">= 1")
        check_range(
            "train.checkpoint_every",
            self.checkpoint_every,
            self.checkpoint_every >= 0,
            ">= 0 (0: only checkpoints/last.pt)",
        )
        for key in ("picture_every", "threads"):
            check_range(f"train.{key}", getattr(self, key), getattr(self, key) >= 0, ">= 0")


MONITORS = ("knn", "rankme")


def check_monitor(t: TrainConfig) -> None:
    """The monitor keys of ``train``: known probes, sensible subset sizes."""
    unknown = [name for name in t.monitor if name not in MONITORS]
    if unknown:
        raise ConfigError(f"train.monitor: unknown {unknown}; choose from {list(MONITORS)}")
    check_range("train.monitor_every", t.monitor_every, t.monitor_every >= 0, ">= 0 (0: off)")
    check_range("train.monitor_bank", t.monitor_bank, t.monitor_bank >= 2, ">= 2")
    check_range("train.monitor_queries", t.monitor_queries, t.monitor_queries >= 1, ">= 1")


LOGGERS = ("jsonl", "tensorboard", "wandb")


def check_loggers(loggers: tuple[str, ...], section: str) -> None:
    """``loggers`` names known sinks and keeps jsonl (the run's own record)."""
    unknown = [name for name in loggers if name not in LOGGERS]
    if unknown:
        raise ConfigError(f"{section}.loggers: unknown {unknown}; choose from {list(LOGGERS)}")
    if "jsonl" not in loggers:
        raise ConfigError(
            f"{section}.loggers must include jsonl (metrics.jsonl is the run's record that "
            f"resume and mimar bench read), e.g. [jsonl, {', '.join(loggers) or 'tensorboard'}]"
        )


@dataclass(frozen=True, kw_only=True)
class PretrainConfig:
    method: MethodConfig = field(default_factory=lambda: _default("method"))
    backbone: BackboneConfig = field(default_factory=lambda: _default("backbone"))
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)  # EVA, iTPN-CLIP, D-iGPT

    def __post_init__(self) -> None:
        b, d = self.backbone, self.data
        if b.in_chans != d.in_chans:
            raise ConfigError(
                f"backbone.in_chans={b.in_chans} but data.in_chans={d.in_chans}: set both equal"
            )
        if b.img_size != d.img_size:
            raise ConfigError(
                f"backbone.img_size={b.img_size} but data.img_size={d.img_size}: set both equal"
            )
        check = getattr(self.method, "check_backbone", None)  # ranges that need both sections
        if check is not None:
            check(b)


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> PretrainConfig:
    """Read a YAML recipe, apply ``dotted.key=value`` overrides, return the typed config."""
    raw = read_recipe(path)
    apply_overrides(raw, overrides)
    return from_dict(raw)


def read_recipe(path: str | Path) -> dict:
    """A YAML recipe as a plain mapping, its one ``base:`` level merged in."""
    return _read_recipe(Path(path))


def apply_overrides(raw: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    """Set every ``dotted.key=value`` of ``overrides`` in ``raw`` (values parsed as YAML)."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {clip(item)} is not of the form dotted.key=value")
        value = recipe_yaml.load(text, f"override {clip(item)}") if text else ""
        _set_dotted(raw, key.strip().split("."), value)
    return raw


def build_section(cls: type, raw: dict, path: str) -> Any:
    """The dataclass ``cls`` of a mapping, with the same checks and messages as recipes
    (unknown keys with close matches, types); ``path`` prefixes the keys in errors."""
    try:
        return _build(cls, raw, path)
    except (TypeError, ValueError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(str(err)) from None


def from_dict(raw: dict) -> PretrainConfig:
    """The typed config of a plain mapping (a recipe after ``base:`` merging, or a checkpoint's
    saved config)."""
    try:
        return _build(PretrainConfig, raw, "")
    except (TypeError, ValueError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(str(err)) from None


def to_dict(cfg: Any) -> Any:
    """Plain YAML-able structure (tuples as lists)."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (tuple, list)):
        return [to_dict(v) for v in cfg]
    return cfg


def config_diff(old: Any, new: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """``(dotted.key, old value, new value)`` for every leaf that differs between two plain
    config mappings (``to_dict`` form); a key missing on one side has the value ``MISSING``."""
    if isinstance(old, dict) and isinstance(new, dict):
        diffs = []
        for key in [*old, *(k for k in new if k not in old)]:
            full = f"{prefix}.{key}" if prefix else str(key)
            diffs += config_diff(old.get(key, MISSING), new.get(key, MISSING), full)
        return diffs
    same = old == new or (old != old and new != new)  # nan == nan here
    return [] if same else [(prefix, old, new)]


MISSING = "<absent>"


def dotted_keys(tree: dict, prefix: str = "") -> list[str]:
    """Every dotted key of a plain config mapping, sections and their leaves, in order."""
    keys = []
    for key, value in tree.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        keys.append(full)
        if isinstance(value, dict):
            keys += dotted_keys(value, full)
    return keys


def save_config(cfg: Any, path: str | Path) -> None:
    writes.write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False), "config")


MAX_RECIPE_BYTES = 1_000_000  # the biggest recipe here is ~3 kB; more is not a recipe


def _read_recipe(path: Path, depth: int = 0) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    size = path.stat().st_size
    if size > MAX_RECIPE_BYTES:  # refused before parsing: YAML parses a 1 GB file for minutes
        raise ConfigError(
            f"{path} is {size / 1e6:.1f} MB: a recipe is at most {MAX_RECIPE_BYTES / 1e6:.0f} MB "
            "(is it the right file?)"
        )
    try:
        raw = recipe_yaml.load(path.read_text(), str(path)) or {}
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not a text file (a YAML recipe)") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping of sections, got {type(raw).__name__}")
    base = raw.pop("base", None)
    if base is None:
        return raw
    if depth:
        raise ConfigError(f"{path}: only one level of 'base:' is allowed")
    if not isinstance(base, str):
        raise ConfigError(f"{path}: base must be a recipe path, got {clip(base)}")
    merged = _read_recipe(path.parent / base, depth + 1)
    _merge(merged, raw)
    return merged


def _merge(into: dict, new: dict) -> None:
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            # A section that switches its dataclass (method/backbone name) starts afresh.
            if "name" in value and value["name"] != into[key].get("name"):
                into[key] = {}
            _merge(into[key], value)
        else:
            into[key] = value


def _set_dotted(raw: dict, keys: list[str], value: Any) -> None:
    node = raw
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"cannot set {'.'.join(keys)}: {key} is not a section")
    node[keys[-1]] = value


def section_from_dict(kind: Literal["method", "backbone"], raw: dict) -> Any:
    """One ``method`` or ``backbone`` section, typed by its ``name`` (e.g. the backbone of an
    exported file)."""
    return _build(_section_class(kind, raw, kind), raw, kind)


def _default(kind: Literal["method", "backbone"]) -> Any:
    return _section_class(kind, {}, kind)()


def _section_class(name: str, raw: Any, path: str) -> type:
    """The dataclass of a ``method`` / ``backbone`` section, picked by its ``name`` key
    (default: the first entry of the table, SimMIM / ViT)."""
    table = names.TABLES[name]
    kind = raw.get("name") if isinstance(raw, dict) else None
    if kind is None:
        kind = next(iter(table))
    if kind not in table:
        raise ConfigError(
            f"{path}.name: unknown {name} {clip(kind)}; choose one of {sorted(table)}"
        )
    return table[kind].config_class()


def _build(cls: type, raw: Any, path: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{path or 'config'}: expected a section (mapping), got {clip(raw)}")
    hints = typing.get_type_hints(cls)
    keys = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        full = f"{path}.{key}" if path else key
        if key not in keys:
            close = difflib.get_close_matches(key, keys, n=3, cutoff=0.5)
            hint = f"; did you mean {' or '.join(close)}?" if close else ""
            raise ConfigError(f"unknown config key {clip(full)}{hint} (valid: {', '.join(keys)})")
        kind = hints[key]
        if not path and key in names.TABLES:
            kwargs[key] = _build(_section_class(key, value, full), value, full)
        elif dataclasses.is_dataclass(kind):
            kwargs[key] = _build(kind, value, full)
        else:
            kwargs[key] = _coerce(value, kind, full)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        message = str(err)
        named = message.split(" ", 1)[0]  # "method.x must be ..." names its key already
        if not ("." in named and named.startswith(f"{path}.".lstrip("."))):
            message = f"{path or 'config'}: {message}"
        raise ConfigError(message) from None


def _coerce(value: Any, kind: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``kind``; convert ints to floats, lists to tuples."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as err:
                errors.append(err)
        raise errors[0]
    if origin is Literal:
        if value in args:
            return value
        raise ConfigError(f"{key}: expected one of {list(args)}, got {clip(value)}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list for {_type_name(kind)}, got {clip(value)}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], key) for v in value)
        if len(value) != len(args):
            raise ConfigError(
                f"{key}: expected {len(args)} values ({_type_name(kind)}), got {clip(value)}"
            )
        return tuple(_coerce(v, a, key) for v, a in zip(value, args))
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind is float and isinstance(value, str):  # YAML 1.1 reads "2e-4" as a string
        try:
            return float(value)
        except ValueError:
            pass
    if kind is Any or (isinstance(kind, type) and isinstance(value, kind)):
        if kind is int and isinstance(value, bool):
            raise ConfigError(f"{key}: expected int, got {clip(value)} (bool)")
        return value
    raise ConfigError(
        f"{key}: expected {_type_name(kind)}, got {clip(value)} ({type(value).__name__})"
    )


def _type_name(kind: Any) -> str:
    if isinstance(kind, type):
        return kind.__name__
    return str(kind).replace("typing.", "")
