"""Frozen-feature extraction shared by the kNN, linear and attentive probes.

One pass over a dataset with the backbone in eval mode. Three shapes of output:

* :func:`extract_features`: one pooled vector per image from the final (normed) tokens or the
  raw output of one block (a "layer tap"), for kNN and linear probes.
* :func:`extract_layer_features`: the same for several taps at once (``--layer all``), from ONE
  forward pass per batch with ``return_layers`` listing every tap.
* :func:`extract_block_tokens`: the mean of the raw outputs of a set of blocks, patch tokens
  kept (prefix excluded), for the attentive probe (AIM, docs/METHODS.md §5.6).

Every function takes an optional ``attn_mask`` (bool, True = allowed, over the whole token
sequence, prefix included); :func:`causal_mask` builds the causal one (in raster or in the
model's own patch order) that AIM's Table 3d uses to compare causal with bidirectional
attention at evaluation time.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Literal

import torch
from rich.progress import track
from torch import nn

from mimar.engine.precision import autocast
from mimar.errors import ConfigError
from mimar.nn.fused import fused_inference

Pool = Literal["avg", "cls"]
POOLS: tuple[str, ...] = ("avg", "cls")
Batches = Iterable[tuple[torch.Tensor, torch.Tensor | None]]


def pool_tokens(tokens: torch.Tensor, pool: Pool, num_prefix_tokens: int) -> torch.Tensor:
    """Pool ``(B, P + N, D)`` tokens into ``(B, D)``.

    "avg" averages the N patch tokens only (prefix tokens excluded, as in MAE's global pool);
    "cls" takes token 0, the first prefix token.
    """
    if pool == "avg":
        return tokens[:, num_prefix_tokens:].mean(dim=1)  # (B, D)
    if pool == "cls":
        if num_prefix_tokens == 0:
            raise ConfigError(
                "pool='cls' needs a backbone with a class token (num_prefix_tokens=0)"
            )
        return tokens[:, 0]  # (B, D)
    raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")


def causal_mask(num_tokens: int, order: torch.Tensor | None = None) -> torch.Tensor:
    """Bool ``(T, T)`` causal mask, True = allowed, over P prefix tokens then N patch tokens.

    Without ``order`` it is lower-triangular: token i sees tokens 0..i. ``order`` (long
    ``(N,)``, as :func:`mimar.masking.patch_order`: ``order[t]`` = raster id of the t-th patch
    read) makes the patches causal in that reading order while the mask keeps the backbone's
    raster token layout: patch i sees patch j iff j is read no later than i. The P = T - N
    prefix tokens come first in either case (prefix token p sees prefix tokens 0..p; every
    patch sees every prefix token). For the raster order both masks are the same.
    """
    if order is None:
        return torch.ones(num_tokens, num_tokens, dtype=torch.bool).tril()
    order, n = order.cpu(), len(order)
    if n > num_tokens or not torch.equal(order.sort().values, torch.arange(n)):
        raise ValueError(f"order must be a permutation of the last {n} of {num_tokens} tokens")
    rank = torch.empty(n, dtype=torch.long)
    rank[order] = torch.arange(n)  # (N,) rank[raster id] = reading position
    rank = torch.cat([torch.arange(num_tokens - n), num_tokens - n + rank])  # (T,)
    return rank[None, :] <= rank[:, None]  # (T, T): [i, j] = j read no later than i


def tap_indices(backbone: nn.Module) -> tuple[int, ...]:
    """Every index ``return_layers`` accepts (the contract's ``layer_dims``): blocks for a ViT
    or HiViT, stages for a Swin."""
    return tuple(range(len(backbone.layer_dims)))


def extract_features(
    backbone: nn.Module,
    batches: Batches,
    *,
    layer: int | None = None,
    pool: Pool = "avg",
    attn_mask: torch.Tensor | None = None,
    device: str | torch.device = "cpu",
    autocast_dtype: torch.dtype | None = None,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run a frozen backbone over ``batches`` and pool one feature vector per image.

    The backbone must already live on ``device``; images are moved there batch by batch. It
    runs in eval mode under ``torch.inference_mode()`` and is put back into its original
    train/eval mode afterwards.

    Args:
        backbone: any module following the Backbone contract (``mimar.backbones.base``).
        batches: iterable of ``(images (B, C, H, W), labels (B,) or None)``.
        layer: None for the final normed ``"tokens"``; ``i`` for the raw output of block ``i``
            (0-based, negative counts from the end), requested via ``return_layers=(i,)``.
        pool: "avg" (mean over patch tokens, prefix excluded) or "cls" (token 0).
        attn_mask: passed to the backbone as is (e.g. :func:`causal_mask`); None = full.
        device: where images are sent; also the autocast device type.
        autocast_dtype: run the forward under ``torch.autocast`` with this dtype when given.
        progress: show a rich progress bar (with a total when ``batches`` has a length).

    Returns:
        ``(features (N, D) float32 on CPU, labels (N,) on CPU or None)``. Labels are None only
        when every batch came without labels.
    """
    feats, labels = extract_layer_features(
        backbone,
        batches,
        layers=(layer,),
        pool=pool,
        attn_mask=attn_mask,
        device=device,
        autocast_dtype=autocast_dtype,
        progress=progress,
    )
    return feats[0], labels


def extract_layer_features(
    backbone: nn.Module,
    batches: Batches,
    *,
    layers: Sequence[int | None],
    pool: Pool = "avg",
    attn_mask: torch.Tensor | None = None,
    device: str | torch.device = "cpu",
    autocast_dtype: torch.dtype | None = None,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Pooled features of several taps from one forward pass per batch.

    ``layers`` entries are as ``layer`` of :func:`extract_features` (None = final tokens).
    Returns ``(features, labels)``: a list of L = ``len(layers)`` float32 ``(N, D_l)`` CPU
    tensors (the widths D_l differ only between Swin stages).
    """
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
    prefix = backbone.num_prefix_tokens
    if pool == "cls" and prefix == 0:
        raise ConfigError("pool='cls' needs a backbone with a class token (num_prefix_tokens=0)")
    taps = tuple(i for i in layers if i is not None)

    def reduce(out: dict) -> list[torch.Tensor]:
        tapped = iter(out.get("layers", ()))
        tokens = [out["tokens"] if i is None else next(tapped) for i in layers]  # (B, P+N, D)
        return [pool_tokens(t, pool, prefix).float().cpu() for t in tokens]  # L x (B, D)

    parts, labels = _run(
        backbone, batches, taps, attn_mask, device, autocast_dtype, progress, reduce
    )
    return [torch.cat(per_layer) for per_layer in zip(*parts)], labels


def extract_block_tokens(
    backbone: nn.Module,
    batches: Batches,
    *,
    blocks: Sequence[int],
    attn_mask: torch.Tensor | None = None,
    device: str | torch.device = "cpu",
    autocast_dtype: torch.dtype | None = None,
    storage_dtype: torch.dtype = torch.bfloat16,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Mean of the raw outputs of ``blocks``, patch tokens only, for the attentive probe.

    As ml-aim v1's ``AverageLayers``: the blocks' outputs are averaged *before* any final norm
    (docs/METHODS.md §5.6); prefix tokens are dropped. The mean is taken in float32 and stored in
    ``storage_dtype`` (bf16 by default: half the memory, float32's range).

    Returns:
        ``(tokens (N, T, D) storage_dtype on CPU, labels)`` with T the number of patch tokens.
    """
    if not blocks:
        raise ValueError("extract_block_tokens needs at least one block")
    prefix = backbone.num_prefix_tokens

    def reduce(out: dict) -> torch.Tensor:
        widths = {t.shape[-1] for t in out["layers"]}
        if len(widths) > 1:
            raise ValueError(f"blocks {tuple(blocks)} have different widths {sorted(widths)}")
        mean = torch.stack([t[:, prefix:].float() for t in out["layers"]]).mean(dim=0)
        return mean.to(storage_dtype).cpu()  # (B, T, D)

    taps = tuple(blocks)
    parts, labels = _run(
        backbone, batches, taps, attn_mask, device, autocast_dtype, progress, reduce
    )
    return torch.cat(parts), labels


def _run(
    backbone: nn.Module,
    batches: Batches,
    return_layers: tuple[int, ...],
    attn_mask: torch.Tensor | None,
    device: str | torch.device,
    autocast_dtype: torch.dtype | None,
    progress: bool,
    reduce: Callable[[dict], Any],
) -> tuple[list, torch.Tensor | None]:
    """The shared loop: eval mode, inference mode, ``reduce(out)`` of every batch (to CPU).

    On a CPU with several threads the batches go to one worker thread per core, each with one
    intra-op thread, in pieces of :data:`CPU_CHUNK` images (see there); elsewhere they run in
    order on this thread. Every image's features are the same either way.
    """
    device = torch.device(device)
    mask = None if attn_mask is None else attn_mask.to(device)

    def forward(images: torch.Tensor) -> Any:  # on a worker: the modes are per thread
        with torch.inference_mode(), autocast(device, autocast_dtype):
            out = backbone(images.to(device), attn_mask=mask, return_layers=return_layers)
            return reduce(out)

    cpu = device.type == "cpu"
    workers = torch.get_num_threads() if cpu and CPU_WORKERS else 1
    items = _maybe_track(batches, progress)
    if cpu:
        items = _pieces(items, CPU_CHUNK)
    parts: list = []
    labels: list[torch.Tensor | None] = []
    was_training = backbone.training
    backbone.eval()
    try:
        inputs = _remember_labels(items, labels)
        with fused_inference(CPU_FUSED):  # bias, GELU inside oneDNN's matmul (mimar/nn/fused.py)
            parts = list(_map_in_order(forward, inputs, workers))
    finally:
        backbone.train(was_training)
    if not parts:
        raise ValueError("feature extraction got no batches")
    # Callers concatenate outside inference mode, so results are ordinary tensors that later
    # probes may use in autograd (inference tensors cannot be saved for backward).
    return parts, _cat_labels(labels)


# Images per forward on a CPU. A tiny ViT's inference is bound by its element-wise ops
# (GELU, softmax, LayerNorm, the bias copies of addmm), which run faster on activations that
# stay in cache. `python -m benchmarks.eval_speed` (demo ViT, bf16, 2 cores, one run): batches
# of 256 with torch's 2 threads 1136 img/s, pieces of 64 1737, pieces on 2 one-thread workers
# 1914, and with the fused linears (mimar.nn.fused) 2183. Pieces of 128 pay the fixed cost
# of a forward (~9 ms of Python and op launches) half as often: 862 -> 894 img/s on one
# thread; on 2 workers 1553 -> 1741, 1545 -> 1682 and 1871 -> 1815 img/s in three runs
# (a shared machine); the same features bit for bit.
CPU_CHUNK = 128
CPU_WORKERS = True  # one worker thread per intra-op thread (False: torch's own threads)
CPU_FUSED = True  # linear layers with their bias and GELU fused (mimar.nn.fused)


def _pieces(batches: Iterable, size: int) -> Iterator:
    """Each ``(images, labels)`` batch cut into pieces of at most ``size`` images."""
    for images, labels in batches:
        for start in range(0, len(images), size):
            piece = None if labels is None else labels[start : start + size]
            yield images[start : start + size], piece


def _remember_labels(batches: Iterable, labels: list) -> Iterator[torch.Tensor]:
    """The images of ``batches``; their labels (or None) are appended to ``labels``."""
    for images, batch_labels in batches:
        labels.append(None if batch_labels is None else torch.as_tensor(batch_labels))
        yield images


def _map_in_order(fn: Callable, items: Iterable, workers: int) -> Iterator:
    """``map(fn, items)``; with several workers, ``fn`` runs on that many threads with one
    intra-op thread each (torch's thread count is process-wide: restored afterwards), at most
    two items per worker in flight, results in input order.

    Threads, not processes: torch releases the GIL inside its kernels, and one intra-op thread
    per worker avoids the per-op fork/join that small tensors do not amortise (1914 against
    1737 img/s, see CPU_CHUNK).
    """
    if workers <= 1:
        yield from map(fn, items)
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(workers) as pool:
            pending: deque[Future] = deque()
            for item in items:
                pending.append(pool.submit(fn, item))
                if len(pending) >= 2 * workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
    finally:
        torch.set_num_threads(threads)


def _cat_labels(labels: list[torch.Tensor | None]) -> torch.Tensor | None:
    if all(y is None for y in labels):
        return None
    if any(y is None for y in labels):
        raise ValueError("either every batch has labels or none does")
    return torch.cat([y.cpu().reshape(-1) for y in labels])  # type: ignore[union-attr]


def _maybe_track(batches: Iterable, progress: bool) -> Iterator:
    if not progress:
        return iter(batches)
    total = len(batches) if hasattr(batches, "__len__") else None  # type: ignore[arg-type]
    # two refreshes a second: at rich's default 10 the bar thread cost ~10 % of the extraction
    bar = track(batches, total=total, description="extracting features", refresh_per_second=2)
    return iter(bar)
