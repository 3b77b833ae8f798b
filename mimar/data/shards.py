"""WebDataset shards: the format, reading a shard, and the eval reader of a whole split.

``data.name=webdataset data.root='/data/in1k/train-{000000..001023}.tar'`` (brace ranges and
``::``-joined lists, as webdataset expands them; local files). A sample is the tar members
sharing a key: one image (``jpg``, ``jpeg``, ``png``, ``webp`` or ``bmp``) and an optional
``cls`` class index, as ``mimar data shard`` writes them (``mimar/data/shard_writer.py``),
with ``shards.json`` beside them (classes; samples and bytes per shard), which ``data shard``
writes last. Readers (training's loader and :func:`load_shards`) refuse a shard folder without
it, or whose shards disagree with it (a listed shard missing, one present but not listed, a
size that changed): it is what tells a complete set from a partial one. Shards written by
another tool get their ``shards.json`` once with ``mimar data index 'PATTERN'``
(:func:`mimar.data.shard_writer.index_shards`: their tar headers counted).
Pretraining streams the shards (``mimar/data/shard_loader.py``).

Evaluation (:func:`load_shards`, the ``load_images`` source) reads a whole split into an
``ImageSet`` in the stored order, resized and center-cropped like image folders, in
``data.num_workers`` workers (a shard each). The test split of ``.../train-{...}.tar`` is the
shards named ``val-*.tar`` (else ``test-*.tar``) in the same folder: the first ``train`` of
each file-name pattern replaced, brace ranges replaced by ``*`` (the image folder's rule of
``train/`` beside ``val/`` or ``test/``).

webdataset is an optional extra, imported only here and only when shards are read or written.
"""

from __future__ import annotations

import importlib.util
import io
import json
import logging
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset

from mimar.data.config import DataConfig
from mimar.data.image_folder import convert_mode, decode_image
from mimar.data.image_set import IMAGENET_MEAN, IMAGENET_STD, ImageSet, match_stats
from mimar.errors import ConfigError, DataError, MissingFileError

log = logging.getLogger("mimar")

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp")  # the sample's image, first one found
INDEX = "shards.json"  # beside the shards: classes and per-shard sample counts


def require_webdataset():
    """The webdataset module, or a one-line error naming the extra that installs it."""
    if importlib.util.find_spec("webdataset") is None:
        raise ConfigError(
            "data.name=webdataset needs the webdataset package: pip install 'mimar[webdataset]'"
        )
    import webdataset

    return webdataset


@dataclass(frozen=True)
class ShardSet:
    """The shards a loader reads: paths, sample counts, classes and normalisation stats."""

    paths: tuple[Path, ...]
    counts: tuple[int, ...]
    classes: list[str] | None
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str = ""

    def __len__(self) -> int:
        return sum(self.counts)


def open_shards(root: str, mean: tuple[float, ...], std: tuple[float, ...]) -> ShardSet:
    """Expand ``root``, check every shard exists, count samples; empty shards are left out."""
    paths = shard_paths(root, "train")
    check_complete(paths, root)
    counts = sample_counts(paths)
    kept = [(p, n) for p, n in zip(paths, counts) if n > 0]
    if not kept:
        raise DataError(f"the shards of data.root={root} hold no samples")
    return ShardSet(
        paths=tuple(p for p, _ in kept),
        counts=tuple(n for _, n in kept),
        classes=read_index(paths[0].parent).get("classes"),
        mean=mean,
        std=std,
        source=f"webdataset shards ({len(kept)} shards, {sum(counts)} samples) from {root}",
    )


def shard_paths(root: str, split: str) -> list[Path]:
    """The shard files of ``split``: ``root`` expanded, or its held-out twin (module docstring)."""
    wds = require_webdataset()
    if split == "train":
        paths = [Path(url) for url in wds.shardlists.expand_urls(root)]
        missing = [p for p in paths if not p.is_file()]
        if missing:
            raise MissingFileError(
                f"{len(missing)} of the {len(paths)} shards of data.root={root} are missing, "
                f"e.g. {missing[0]}"
            )
        return paths
    patterns = root.split("::")
    for word in ("val", "test"):
        found = [p for pattern in patterns for p in _held_out(pattern, word)]
        if found:
            return found
    raise MissingFileError(
        f"no test split for the shards {root}: expected shards named like them with 'train' "
        "replaced by 'val' or 'test' in the same folder (e.g. val-000000.tar)"
    )


def _held_out(pattern: str, word: str) -> list[Path]:
    folder, name = Path(pattern).parent, Path(pattern).name
    if "train" not in name:
        return []
    glob = re.sub(r"\{[^}]*\}", "*", name.replace("train", word, 1))
    return sorted(p for p in folder.glob(glob) if p.is_file())


WRITING = ".shards-writing"  # mimar data shard's marker: shards.json is not written yet


def writing_marker(folder: Path, pattern_name: str = "") -> Path:
    """The file ``mimar data shard`` keeps in ``folder`` (one per shard name pattern) until
    its ``shards.json`` is written."""
    return folder / f"{WRITING}-{_stem(pattern_name)}"


def check_complete(paths: list[Path], root: str = "") -> None:
    """Refuse shards that an interrupted ``mimar data shard`` left (its marker is still
    there), a folder without ``shards.json``, and a set that disagrees with it (a listed shard
    of the same name pattern missing, or one present that it does not list): each would be
    read silently as a smaller or another data set. ``root``: the pattern, for the message."""
    for folder in sorted({p.parent for p in paths}):
        if any(folder.glob(f"{WRITING}-*")):
            raise DataError(
                f"the shards in {folder} are incomplete: mimar data shard was interrupted "
                f"there ({WRITING} is present, {INDEX} not written); rerun it with --resume, "
                "or remove the folder and shard again"
            )
        names = {p.name for p in paths if p.parent == folder}
        glob = folder / re.sub(r"\d+", "*", sorted(names)[0])  # e.g. DIR/val-*.tar
        index_them = f"mimar data index '{root or glob}'"
        listed = set(read_index(folder).get("shards", {}))
        if not listed:
            raise DataError(
                f"the shards in {folder} have no {INDEX} (mimar data shard writes it last, so "
                f"without it a set may be partial); shards from another tool: index them once "
                f"with {index_them}"
            )
        unknown = sorted(names - listed)
        same_pattern = {n for n in listed if _stem(n) in {_stem(m) for m in names}}
        missing = sorted(same_pattern - {p.name for p in folder.iterdir()})
        if unknown or missing:
            problem = f"{unknown[0]} is not in it" if unknown else f"{missing[0]} is missing"
            raise DataError(
                f"the shards in {folder} disagree with its {INDEX} ({problem}); shard the "
                f"images again into an empty folder, or (shards from another tool) {index_them}"
            )


def _stem(name: str) -> str:
    return re.sub(r"\d+", "#", name)


def read_index(folder: Path) -> dict:
    """``folder/shards.json`` as written by ``mimar data shard``, or {} when absent."""
    path = folder / INDEX
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise DataError(
            f"{path} is not valid JSON; delete it and count the shards anew with "
            f"mimar data index 'PATTERN'"
        ) from None


def sample_counts(paths: list[Path]) -> list[int]:
    """Samples per shard, from the ``shards.json`` beside each (:func:`check_complete` has
    checked that it lists them); a shard whose size is not the indexed one was rewritten
    since, and is counted again from its tar headers."""
    indexes: dict[Path, dict] = {}
    counts = []
    for path in paths:
        index = indexes.setdefault(path.parent, read_index(path.parent)).get("shards", {})
        entry = index.get(path.name, {})
        if entry.get("bytes") == path.stat().st_size and "samples" in entry:
            counts.append(int(entry["samples"]))
            continue
        log.info("counting %s from its tar headers (its size is not the one in %s)", path, INDEX)
        counts += count_samples([path])
    return counts


def count_samples(paths: list[Path]) -> list[int]:
    """Samples per shard from its tar headers (members are seeked over, not read): what
    ``mimar data shard`` and ``mimar data index`` write into ``shards.json``."""
    wds = require_webdataset()
    counts = []
    for path in paths:
        try:
            with tarfile.open(path, "r:") as tar:
                keys = [wds.tariterators.base_plus_ext(m.name)[0] for m in tar if m.isreg()]
        except (tarfile.TarError, OSError) as err:
            raise DataError(f"cannot read shard {path}: {err}") from None
        keys = [k for k in keys if k is not None and not k.startswith("__")]
        counts.append(sum(1 for i, k in enumerate(keys) if i == 0 or k != keys[i - 1]))
    return counts


def read_shard(path: Path) -> list[dict]:
    """Every sample of one shard in stored order, undecoded: ``{"__key__", ext: bytes}``."""
    wds = require_webdataset()
    try:
        return list(wds.tarfile_samples([{"url": str(path)}]))
    except (tarfile.TarError, OSError, ValueError) as err:
        raise DataError(f"cannot read shard {path}: {err.args[0] if err.args else err}") from None


def decode_sample(sample: dict, in_chans: int) -> torch.Tensor:
    """The sample's image as uint8 ``(in_chans, H, W)``, at its stored size."""
    with Image.open(io.BytesIO(sample[_image_key(sample)])) as img:
        img.load()
        array = np.asarray(convert_mode(img, "L" if in_chans == 1 else "RGB"), dtype=np.uint8)
    array = array[:, :, None] if array.ndim == 2 else array
    return torch.from_numpy(array.copy()).permute(2, 0, 1)  # (C, H, W)


def _image_key(sample: dict) -> str:
    key = next((k for k in IMAGE_KEYS if k in sample), None)
    if key is None:
        raise DataError(
            f"sample {sample.get('__key__')} of shard {sample.get('__url__')} has no image "
            f"(one of {', '.join(IMAGE_KEYS)})"
        )
    return key


def failure_reason(err: Exception) -> str:
    if isinstance(err, UnidentifiedImageError):  # its message shows a BytesIO repr
        return "not an image PIL can read"
    return f"{type(err).__name__}: {err}"


class _DecodeShards(Dataset):
    """Eval view of whole shards by index, so a DataLoader spreads reading and decoding:
    item ``i`` is ``[(sample, uint8 (S, S, C) or the reason it failed), ...]`` of shard ``i``,
    the samples without their image bytes (or one string: the shard is unreadable)."""

    def __init__(self, paths: list[Path], size: int, in_chans: int) -> None:
        self.paths, self.size, self.in_chans = paths, size, in_chans

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> list[tuple[dict, np.ndarray | str]] | str:
        try:
            samples = read_shard(self.paths[i])
        except DataError as err:
            return str(err)
        return [(_meta(sample), self._decode(sample)) for sample in samples]

    def _decode(self, sample: dict) -> np.ndarray | str:
        try:
            return decode_image(io.BytesIO(sample[_image_key(sample)]), self.size, self.in_chans)
        except Exception as err:  # PIL raises many types for damaged files
            return (
                f"sample {sample.get('__key__')} of {sample.get('__url__')}: {failure_reason(err)}"
            )


def _meta(sample: dict) -> dict:
    return {k: v for k, v in sample.items() if k.startswith("__") or k == "cls"}


def _unchanged(item):
    return item


def load_shards(cfg: DataConfig, split: str) -> ImageSet:
    """One split of shards in memory (stored order; ``cfg.max_images``: the first ones)."""
    paths = shard_paths(cfg.root, split)
    check_complete(paths, cfg.root if split == "train" else "")
    if cfg.max_images:  # only the shards that hold the first max_images samples
        ends = np.cumsum(sample_counts(paths))
        paths = paths[: int(np.searchsorted(ends, cfg.max_images)) + 1]
    shards = DataLoader(
        _DecodeShards(paths, cfg.img_size, cfg.in_chans),
        batch_size=None,
        num_workers=min(cfg.num_workers, len(paths)),
        collate_fn=_unchanged,
    )
    kept, arrays, bad = [], [], []
    for shard in shards:
        if isinstance(shard, str):
            raise DataError(shard)
        for meta, item in shard:
            if cfg.max_images and len(kept) + len(bad) == cfg.max_images:
                break
            if isinstance(item, str):
                bad.append(item)
            else:
                kept.append(meta)
                arrays.append(item)
    if not kept and not bad:
        raise DataError(f"the {split} shards of {cfg.root} hold no samples")
    if bad and (cfg.on_bad_image == "error" or not arrays):
        raise DataError(f"cannot decode {bad[0]} (set data.on_bad_image=skip to skip it)")
    labels = _labels(kept)
    classes = read_index(paths[0].parent).get("classes") if labels is not None else None
    if classes is not None and labels is not None and int(labels.max()) >= len(classes):
        # a label past the index's classes would be scored against some other class
        raise DataError(
            f"the {split} shards of {cfg.root} hold label {int(labels.max())} but their "
            f"{INDEX} names {len(classes)} classes; rewrite them with mimar data shard"
        )
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    return ImageSet(
        images=images,  # (N, C, S, S)
        labels=labels,
        classes=classes,
        mean=match_stats(IMAGENET_MEAN, cfg.in_chans),
        std=match_stats(IMAGENET_STD, cfg.in_chans),
        skipped=len(bad),
        source=f"webdataset {split} ({len(arrays)} samples, {len(bad)} skipped) from "
        f"{len(paths)} shards like {paths[0]}",
    )


def _labels(samples: list[dict]) -> torch.Tensor | None:
    """int64 ``(N,)`` from every sample's ``cls``, or None when no sample has one."""
    has = [s for s in samples if "cls" in s]
    if not has:
        return None
    if len(has) < len(samples):
        raise DataError(f"{len(samples) - len(has)} of {len(samples)} samples have no cls label")
    try:
        labels = torch.tensor([int(s["cls"].decode()) for s in samples], dtype=torch.long)
    except (ValueError, UnicodeDecodeError):
        bad = next(s for s in samples if not s["cls"].strip().isdigit())
        raise DataError(
            f"sample {bad.get('__key__')} of {bad.get('__url__')}: cls must be an integer, "
            f"got {bad['cls'][:20]!r}"
        ) from None
    if int(labels.min()) < 0:  # would index the class list from its end: another class
        bad = samples[int(labels.argmin())]
        raise DataError(
            f"sample {bad.get('__key__')} of {bad.get('__url__')}: cls must be >= 0, "
            f"got {int(labels.min())}"
        )
    return labels
