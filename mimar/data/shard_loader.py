"""ShardLoader: pretraining batches streamed from WebDataset shards, with exact resume.

Training (:class:`ShardLoader`) streams the shards from disk; the ``data.num_workers``
DataLoader workers read, decode, crop and flip (per sample: shards may hold any image size)
and the batches come back in pinned memory when training on CUDA. With ``W = max(1,
num_workers)`` and a per-rank batch ``b = data.batch_size / world_size``:

* pass ``p`` over the data: the shard order is a permutation drawn from ``(seed, p)``; rank
  ``r`` takes ``order[r::world]``, its worker stream ``k`` every W-th of those; inside a shard
  the samples are read in a permutation drawn from ``(seed, p, shard)`` (a worker holds one
  shard's undecoded bytes at a time). Together the
  streams' pass ``p`` reads every sample exactly once. Needs ``shards >= world_size x W``
  (else a one-line error: every stream needs a shard); empty shards are left out.
* each stream concatenates its passes ``p = 0, 1, ...`` and is cut into batches of ``b``
  consecutive samples; step ``t`` of a rank is batch ``t // W`` of its stream ``t % W``.
* each sample's crop and flip are drawn from ``(seed, p, shard, its index in the shard)``.
* epochs are nominal: ``steps_per_epoch = samples // data.batch_size``, the samples counted
  once at start from ``shards.json`` beside the shards (written by ``mimar data shard`` or
  ``mimar data index``; a folder without it is refused). Streams cross their pass boundaries
  on their own: with shards of unequal sizes a stream's pass drifts from the step-epochs by
  its shards' size differences.

Exact resume: for the same shards, seed, ``data.batch_size``, world size and
``data.num_workers``, the batches from step ``t`` on are those of an uninterrupted run, at
any ``t`` (mid-epoch, mid-shard): each stream skips the samples of its first batches before
``t``, whole shards by their counts (not opened) and the rest of the current shard by reading
its members without decoding them (tested: ``tests/test_webdataset.py``). Approximate: (1) a
resume with another world size, worker count or batch size lays the streams out anew, as if
that layout had run from step 0: the shard order and each sample's crop of every pass stay
the same, but in the current pass some samples are read twice and others not at all; (2) with
``data.on_bad_image=skip`` a skipped image shifts its stream by one sample, and the count-based
fast-forward does not know of it, so a resume after it is one sample off per skipped image.

webdataset reads the tar members (``tarfile_samples``); the layout above is ours rather than a
``wds.WebDataset(...).shuffle(n)`` pipeline because a shuffle buffer's state cannot be
restored without replaying everything before it, while here every position is a function of
(seed, step).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from itertools import count

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mimar.data.augment import BatchAugment, CropParams
from mimar.data.config import DataConfig
from mimar.data.loader import STREAMS, check_split, derive_seed
from mimar.data.shards import (
    INDEX,
    ShardSet,
    decode_sample,
    failure_reason,
    open_shards,
    read_shard,
)
from mimar.errors import ConfigError, DataError

_SHARD_ORDER = 5  # seeds (seed, pass, 5): the order of the shards in a pass
_SAMPLE_ORDER = 6  # seeds (seed, pass, shard, 6): the order of a shard's samples
_SAMPLE_AUGMENT = 7  # seeds (seed, pass, shard, index, 7): one sample's crop and flip


class ShardStreams(IterableDataset):
    """The worker streams of one rank (module docstring), the DataLoader's dataset: iterating
    yields ``(step, batch)`` from ``start`` on, DataLoader worker ``w`` serving stream
    ``(w + start) % W`` so that its round-robin over the workers gives steps ``start, start +
    1, ...``. A failure is yielded as ``(step, message)``, for the main process to raise as
    one line. Holds no reference to the loader (a cycle would delay the workers' shutdown)."""

    def __init__(
        self,
        shards: ShardSet,
        augment: BatchAugment,
        *,
        per_rank: int,
        seed: int,
        rank: int,
        world_size: int,
        streams: int,
        in_chans: int,
        skip_bad: bool,
    ) -> None:
        self.shards, self.augment, self.per_rank, self.seed = shards, augment, per_rank, seed
        self.rank, self.world_size, self.streams = rank, world_size, streams
        self.in_chans, self.skip_bad = in_chans, skip_bad
        self.start = 0

    def starting_at(self, start: int) -> ShardStreams:
        """A copy whose iteration begins at step ``start``."""
        other = copy.copy(self)
        other.start = start
        return other

    def __iter__(self) -> Iterator[tuple[int, torch.Tensor | str]]:
        info = get_worker_info()
        worker = 0 if info is None else info.id
        yield from self.stream_batches((worker + self.start) % self.streams, self.start)

    def stream_shards(self, pass_index: int, stream: int) -> list[int]:
        """Shard indices (into ``shards.paths``) that ``stream`` of this rank reads in a pass."""
        gen = torch.Generator().manual_seed(derive_seed(self.seed, pass_index, _SHARD_ORDER))
        order = torch.randperm(len(self.shards.paths), generator=gen).tolist()
        return order[self.rank :: self.world_size][stream :: self.streams]

    def stream_batches(self, stream: int, start: int) -> Iterator[tuple[int, torch.Tensor | str]]:
        """``(step, batch)`` of one stream from its first step ``>= start``; endless."""
        first = max(0, -(-(start - stream) // self.streams))  # ceil: its batches before start
        rows: list[tuple[torch.Tensor, CropParams]] = []
        step, skipped = stream + first * self.streams, 0
        try:
            for pass_index, shard, index, sample in self.stream_samples(
                stream, first * self.per_rank
            ):
                row = self._drawn(sample, pass_index, shard, index)
                if row is None:  # data.on_bad_image=skip
                    skipped += 1
                    if skipped > len(self.shards):  # a whole pass of bad images: never ends
                        raise DataError(f"every image of {self.shards.source} is unreadable")
                    continue
                rows.append(row)
                skipped = 0
                if len(rows) == self.per_rank:
                    yield step, self._cropped(rows)  # (b, C, S, S)
                    rows, step = [], step + self.streams
        except DataError as err:
            yield step, str(err)

    def stream_samples(self, stream: int, skip: int) -> Iterator[tuple[int, int, int, dict]]:
        """``(pass, shard, index in shard, raw sample)`` of a stream after its first ``skip``
        samples; endless."""
        counts = self.shards.counts
        for pass_index in count():
            shards = self.stream_shards(pass_index, stream)
            total = sum(counts[s] for s in shards)
            if skip >= total:  # a whole pass before the resume point: nothing is opened
                skip -= total
                continue
            for shard in shards:
                if skip >= counts[shard]:
                    skip -= counts[shard]
                    continue
                samples = read_shard(self.shards.paths[shard])
                if len(samples) != counts[shard]:
                    raise DataError(
                        f"shard {self.shards.paths[shard]} holds {len(samples)} samples, its "
                        f"count said {counts[shard]}; delete {INDEX} beside it to count again"
                    )
                seed = derive_seed(self.seed, pass_index, shard, _SAMPLE_ORDER)
                order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(seed))
                for index in order[skip:].tolist():  # the skipped ones are not decoded
                    yield pass_index, shard, index, samples[index]
                skip = 0

    def _drawn(self, sample: dict, pass_index: int, shard: int, index: int):
        """One sample decoded, uint8 ``(1, C, H, W)``, with its crop and flip; None: skipped."""
        try:
            image = decode_sample(sample, self.in_chans)[None]  # (1, C, H, W) uint8
        except DataError:
            raise
        except Exception as err:  # PIL raises many types for damaged files
            if self.skip_bad:
                return None
            raise DataError(
                f"cannot decode sample {sample.get('__key__')} of {self.shards.paths[shard]}: "
                f"{failure_reason(err)} (set data.on_bad_image=skip to skip it)"
            ) from None
        seed = derive_seed(self.seed, pass_index, shard, index, _SAMPLE_AUGMENT)
        params = self.augment.sample_params(
            1, tuple(image.shape[-2:]), torch.Generator().manual_seed(seed)
        )
        return image, params

    def _cropped(self, rows: list[tuple[torch.Tensor, CropParams]]) -> torch.Tensor:
        """The batch's crops: one batched ``apply`` per source size (per-sample ops cost more
        than the crops of small images); float ``(b, C, S, S)`` in the rows' order."""
        out = [torch.empty(0)] * len(rows)
        for size in dict.fromkeys(image.shape for image, _ in rows):
            picks = [i for i, (image, _) in enumerate(rows) if image.shape == size]
            params = [rows[i][1] for i in picks]
            fields = ("top", "left", "height", "width", "flip")
            joined = CropParams(
                **{f: torch.cat([getattr(p, f) for p in params]) for f in fields},
                src_hw=params[0].src_hw,
            )
            crops = self.augment.apply(torch.cat([rows[i][0] for i in picks]), joined)
            for i, crop in zip(picks, crops):
                out[i] = crop
        return torch.stack(out)


class ShardLoader:
    """This rank's batches of global step ``t`` read from WebDataset shards.

    Offers what the engine uses of :class:`~mimar.data.loader.StepLoader`: ``inputs(step)``
    (called with consecutive steps; any other step restarts the stream there), ``batch``,
    ``batch_size`` (global), ``rank``, ``world_size``, ``generator_for``, ``epoch_of``,
    ``steps_per_epoch`` and ``images`` (the :class:`ShardSet`). ``data`` is the layout.
    """

    def __init__(
        self,
        shards: ShardSet,
        augment: BatchAugment,
        *,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        in_chans: int = 3,
        skip_bad: bool = False,
        pin_memory: bool = False,
    ) -> None:
        check_split(batch_size, rank, world_size)
        streams = max(1, num_workers)  # W: one stream per DataLoader worker
        if len(shards.paths) < world_size * streams:
            raise DataError(
                f"{len(shards.paths)} shards for {world_size} rank(s) x {streams} stream(s) "
                "(data.num_workers): every worker needs a shard; write smaller shards "
                "(mimar data shard --shard-size) or lower data.num_workers"
            )
        if len(shards) < batch_size:
            raise DataError(
                f"{shards.source} has {len(shards)} samples, fewer than "
                f"data.batch_size={batch_size}; lower the batch size or add shards"
            )
        self.images, self.batch_size, self.seed = shards, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.steps_per_epoch = len(shards) // batch_size  # nominal, see the module docstring
        self.data = ShardStreams(
            shards,
            augment,
            per_rank=batch_size // world_size,
            seed=seed,
            rank=rank,
            world_size=world_size,
            streams=streams,
            in_chans=in_chans,
            skip_bad=skip_bad,
        )
        self._iter: Iterator | None = None
        self._next = -1  # the step the running DataLoader yields next

    def inputs(self, step: int, device: torch.device | str | None = None) -> dict:
        """What the engine feeds the model at ``step``: ``{"images": (b, C, S, S)}``."""
        if step != self._next or self._iter is None:  # a start or a resume: (re)start there
            self._iter = None  # the old workers stop first
            loader = DataLoader(
                self.data.starting_at(step),
                batch_size=None,
                num_workers=self.num_workers,
                pin_memory=self.pin_memory,
            )
            self._iter = iter(loader)
        tagged, images = next(self._iter)
        self._next = step + 1
        images = _checked(tagged, images, step)
        return {"images": images if device is None else images.to(device, non_blocking=True)}

    def batch(self, step: int, device: torch.device | str | None = None) -> torch.Tensor:
        """This rank's ``step`` batch read here, in this process, leaving the running stream
        alone (the run's pictures, tests)."""
        tagged, images = next(self.data.stream_batches(step % self.data.streams, step))
        images = _checked(tagged, images, step)
        return images if device is None else images.to(device)

    def generator_for(self, step: int, stream: str = "method") -> torch.Generator:
        """A CPU generator for ``step``'s draws (``"method"``: masks; ``"network"``: drop
        path), as :meth:`StepLoader.generator_for`."""
        return torch.Generator().manual_seed(derive_seed(self.seed, step, STREAMS[stream]))

    def epoch_of(self, step: int) -> float:
        """Fractional (nominal) epoch reached at ``step``."""
        return step / self.steps_per_epoch


def _checked(tagged: int, images: torch.Tensor | str, step: int) -> torch.Tensor:
    if isinstance(images, str):
        raise DataError(images)
    if tagged != step:  # the DataLoader's worker order broke the layout: never silently
        raise RuntimeError(f"shard loader: expected the batch of step {step}, got {tagged}")
    return images


def build_shard_loader(
    cfg: DataConfig,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    *,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    pin_memory: bool = False,
) -> ShardLoader:
    """The training loader over ``cfg.root``'s shards with ``cfg``'s crop, flip and batch."""
    if cfg.max_images:
        raise ConfigError(
            "data.max_images does not apply to webdataset training; pick shards with the "
            "brace range of data.root instead"
        )
    shards = open_shards(cfg.root, mean, std)
    augment = BatchAugment(cfg.img_size, cfg.scale, cfg.ratio, cfg.hflip, mean, std)
    return ShardLoader(
        shards,
        augment,
        batch_size=cfg.batch_size,
        seed=seed,
        rank=rank,
        world_size=world_size,
        num_workers=cfg.num_workers,
        in_chans=cfg.in_chans,
        skip_bad=cfg.on_bad_image == "skip",
        pin_memory=pin_memory,
    )
