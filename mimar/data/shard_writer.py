"""``mimar data shard``: pack an image folder into WebDataset shards (``webdataset.TarWriter``).

Each sample is ``{"__key__": 8-digit index, <ext>: the file's bytes, "cls": class index}``: the
encoded bytes are kept as they are (no re-encoding), ``cls`` only when every image sits in a
class sub-folder (sorted names, as the image-folder reader labels them). Samples are written
in a random order drawn from ``seed``, so that every shard mixes the classes: the training
loader shuffles shards and the samples inside each shard, never across shards.

Beside the shards, ``shards.json`` holds the classes and each shard's sample count and size
(the loader's epoch length without reading the tar headers). Shards of another split written
to the same folder (``val-%06d.tar``) are added to it, labelled with the classes already there
when theirs are among them (a held-out split that lacks a class keeps the train indices).
Each shard is written under a temporary name and renamed when complete; a folder that already
holds shards of the pattern is refused, so nothing already written is overwritten.

Every image is checked with PIL's ``verify`` (its header and, for PNG, its checksums; not a
full decode, so a truncated JPEG still reaches the loader, whose ``data.on_bad_image``
applies): one that fails stops the writer with its path (``on_bad_image="error"``, after
removing the shards this call wrote) or is left out and counted (``"skip"``).
"""

from __future__ import annotations

import io
import json
import re
import time
from pathlib import Path

import torch
from PIL import Image
from rich.console import Console
from rich.progress import MofNCompleteColumn, Progress, TimeElapsedColumn

from mimar import writes
from mimar.data.image_folder import class_labels, folder_classes, list_images
from mimar.data.shards import (
    INDEX,
    WRITING,
    count_samples,
    read_index,
    require_webdataset,
    writing_marker,
)
from mimar.errors import ConfigError, DataError, MissingFileError

_NUMBER = re.compile(r"%0?\d*d")  # the shard number of a pattern: %d, %06d


def write_shards(
    folder: str | Path,
    pattern: str,
    *,
    shard_size: int = 1000,
    seed: int = 0,
    on_bad_image: str = "error",
    progress=True,
    resume: bool = False,
) -> dict:
    """Write ``folder``'s images as shards ``pattern % 0, pattern % 1, ...`` of ``shard_size``
    samples (the last one may be smaller, and so is one that lost unreadable images under
    ``on_bad_image="skip"``); returns a summary with the brace pattern to train with
    (``data.root``) and the skipped files."""
    start = time.perf_counter()
    wds = require_webdataset()
    folder = Path(folder)
    pre, post = _check_pattern(pattern)
    if shard_size < 1:
        raise ConfigError(f"--shard-size must be >= 1, got {shard_size}")
    if on_bad_image not in ("error", "skip"):
        raise ConfigError(f"--on-bad-image must be error or skip, got {on_bad_image!r}")
    paths = _images_of(folder)
    out = Path(pattern).parent
    classes, labels = _classes(folder, paths, read_index(out).get("classes"))
    existing = sorted(out.glob(_NUMBER.sub("*", Path(pattern).name)))
    marker = writing_marker(out, Path(pattern).name)
    if existing and marker.exists() and not resume:
        raise ConfigError(
            f"an interrupted mimar data shard left {len(existing)} shard(s) of "
            f"{Path(pattern).name} in {out} and no {INDEX} entry for them: continue it with "
            f"the same command and --resume, or remove {out} to start over"
        )
    if existing and not marker.exists():
        raise ConfigError(
            f"{out} already holds shards of {Path(pattern).name} ({existing[0].name} ...); "
            "remove them or choose another pattern"
        )
    writes.make_dir(out, "shard folder")
    # Present from the first shard until shards.json is written last: readers refuse the
    # folder meanwhile, and a killed writer leaves it behind for --resume.
    writes.write_text(marker, json.dumps({"pattern": pattern, "seed": seed}), "shard marker")
    order = torch.randperm(len(paths), generator=torch.Generator().manual_seed(seed)).tolist()
    written: dict[str, dict] = {}
    skipped: list[Path] = []
    columns = (*Progress.get_default_columns(), MofNCompleteColumn(), TimeElapsedColumn())
    console = Console(stderr=True)
    with Progress(*columns, console=console, disable=not (progress and console.is_terminal)) as bar:
        task = bar.add_task("shards", total=len(paths))
        try:
            for shard, first in enumerate(range(0, len(order), shard_size)):
                picks = order[first : first + shard_size]
                target = Path(pattern % shard)
                if resume and target.is_file():  # complete: shards are renamed when done
                    size, count = target.stat().st_size, count_samples([target])[0]
                    bar.advance(task, len(picks))
                else:
                    samples = _samples(picks, paths, labels, on_bad_image, skipped)
                    size, count = _write_shard(wds, target, samples, lambda: bar.advance(task))
                written[target.name] = {"samples": count, "bytes": size}
        except DataError:  # an unreadable image: leave no partial set of shards behind
            for name in written:
                (out / name).unlink(missing_ok=True)
            marker.unlink(missing_ok=True)
            raise
    _update_index(out, classes, written)
    marker.unlink(missing_ok=True)
    n = len(written)
    number = _NUMBER.search(pattern).group(0)  # type: ignore[union-attr]
    root = pattern % 0 if n == 1 else f"{pre}{{{number % 0}..{number % (n - 1)}}}{post}"
    return {
        "shards": n,
        "images": len(paths) - len(skipped),
        "skipped": [str(p) for p in skipped],
        "classes": len(classes) if classes else 0,
        "root": root,
        "seconds": round(time.perf_counter() - start, 2),
    }


def _check_pattern(pattern: str) -> tuple[str, str]:
    """The text before and after the pattern's one ``%d``-style shard number."""
    numbers = _NUMBER.findall(pattern)
    if len(numbers) != 1 or pattern.count("%") != 1 or "%" in str(Path(pattern).parent):
        raise ConfigError(
            f"shard pattern {pattern!r} needs exactly one %d-style shard number in its file "
            "name, e.g. 'OUT_DIR/train-%06d.tar'"
        )
    if not pattern.endswith(".tar"):
        raise ConfigError(f"shard pattern {pattern!r} must end in .tar")
    pre, post = _NUMBER.split(pattern)
    return pre, post


def _images_of(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise MissingFileError(f"image folder {folder} does not exist or is not a directory")
    splits = [name for name in ("val", "test") if (folder / name).is_dir()]
    if (folder / "train").is_dir() and splits:
        raise ConfigError(
            f"{folder} holds splits (train/, {splits[0]}/): shard each one by itself, e.g. "
            f"mimar data shard {folder / 'train'} 'OUT_DIR/train-%06d.tar', then "
            f"{folder / splits[0]} 'OUT_DIR/{splits[0]}-%06d.tar'"
        )
    paths = list_images(folder)
    if not paths:
        raise MissingFileError(
            f"no images found under {folder}: expected jpg, jpeg, png, webp or bmp files, "
            "directly or in class sub-folders"
        )
    return paths


def _classes(
    folder: Path, paths: list[Path], reference: list[str] | None
) -> tuple[list[str] | None, list[int]]:
    """The image folder reader's classes and labels (:func:`class_labels`); classes that the
    output folder's index lacks are refused (its shards would number them differently)."""
    names = folder_classes(folder, paths)
    extra = sorted(set(names or []) - set(reference or names or []))
    if extra:
        raise DataError(
            f"{folder} has classes {extra[:3]} that the {INDEX} of the output folder lacks; "
            "write shards of another class set to another folder"
        )
    return class_labels(folder, paths, reference)


def _samples(picks, paths, labels, on_bad_image: str, skipped: list[Path]):
    """The samples of ``picks`` (indices into ``paths``); an unreadable image raises, or is
    appended to ``skipped`` and yields None (counted by the progress bar, not written)."""
    for i in picks:
        try:  # a read error is the image's, not the shard's (whose writes are guarded)
            data = paths[i].read_bytes()
        except OSError as err:
            raise DataError(f"cannot read {paths[i]}: {err.strerror or err}") from None
        if _readable(data):
            yield _sample(i, paths[i], data, labels[i] if labels else None)
        elif on_bad_image == "error":
            raise DataError(
                f"cannot read {paths[i]}: not an image PIL can read (fix or remove it, or pass "
                "--on-bad-image skip to leave such files out)"
            )
        else:
            skipped.append(paths[i])
            yield None


def _readable(data: bytes) -> bool:
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.verify()
    except Exception:  # PIL raises many types for damaged files
        return False
    return True


def _sample(index: int, path: Path, data: bytes, label: int | None) -> dict:
    # the original encoded bytes under the file's own extension: no re-encoding
    sample = {"__key__": f"{index:08d}", path.suffix.lower().lstrip("."): data}
    return sample if label is None else sample | {"cls": str(label)}


def _write_shard(wds, target: Path, samples, advance) -> tuple[int, int]:
    """Write one shard under a temporary name, renamed when complete (the write layer's
    :func:`~mimar.writes.atomic_file`); returns its size in bytes and its number of samples
    (None items are skipped)."""
    count = 0
    with writes.atomic_file(target, "shard") as stream, wds.TarWriter(stream, mtime=0.0) as tar:
        for sample in samples:
            if sample is not None:
                tar.write(sample)
                count += 1
            advance()
    return target.stat().st_size, count


def index_shards(pattern: str, classes: list[str] | None = None) -> dict:
    """``mimar data index``: write the ``shards.json`` of shards another tool wrote (readers
    refuse shards without one): each shard's samples counted once from its tar headers, and
    its size. ``pattern``: brace ranges, ``::`` lists and ``*`` globs, as ``data.root``;
    ``classes``: the class names, label order (default: those an index there already has).
    Shards already listed are recounted; other entries stay. Returns a summary."""
    wds = require_webdataset()
    words = [Path(url) for url in wds.shardlists.expand_urls(pattern)]
    paths: list[Path] = []
    for word in words:
        if any(c in word.name for c in "*?["):
            paths += sorted(p for p in word.parent.glob(word.name) if p.is_file())
        elif word.is_file():
            paths.append(word)
        else:
            raise MissingFileError(f"shard {word} (of {pattern}) not found")
    if not paths:
        raise MissingFileError(f"no shard files match {pattern}")
    folders = sorted({p.parent for p in paths})
    for folder in folders:
        if any(folder.glob(f"{WRITING}-*")):
            raise ConfigError(
                f"an interrupted mimar data shard left {folder}: finish it with the same "
                "command and --resume (it writes the index), or remove the folder"
            )
    counts = dict(zip(paths, count_samples(paths), strict=True))
    for folder in folders:
        written = {
            p.name: {"samples": n, "bytes": p.stat().st_size}
            for p, n in counts.items()
            if p.parent == folder
        }
        _update_index(folder, classes or read_index(folder).get("classes"), written)
    return {
        "shards": len(paths),
        "samples": sum(counts.values()),
        "classes": len(classes or read_index(folders[0]).get("classes") or []),
        "index": [str(f / INDEX) for f in folders],
    }


def _update_index(out: Path, classes: list[str] | None, written: dict[str, dict]) -> None:
    index = read_index(out)
    index["shards"] = index.get("shards", {}) | written
    if classes is not None:
        index["classes"] = classes
    writes.write_text(out / INDEX, json.dumps(index, indent=1, sort_keys=True), "shard index")
