"""``train.strategy=fsdp``: FSDP2 sharding and sharded (DCP) checkpoints that reshard.

Sharding (``torch.distributed.fsdp.fully_shard``): every outermost module that is an entry of
an ``nn.ModuleList`` (the transformer blocks of the backbone, of a teacher, of an EMA copy, of
a decoder) is one FSDP unit, and the root takes what is left (patch embedding, tokens, heads).
Each rank keeps ``1 / world`` of every parameter (``Shard(0)`` DTensors) and all-gathers a
unit's weights for its forward and backward only. Frozen modules are sharded the same way:
a frozen teacher then costs ``1 / world`` of its memory per rank, and an EMA copy (iTPN's MFM
teacher), built as a copy of the network it follows, gets the same placements, so its update
``ema = m * ema + (1 - m) * online`` stays local to each rank's shard. Neither is in the
optimizer (``requires_grad`` is off; ``param_groups`` skips them). With
``train.precision=bf16`` the mixed-precision policy gathers parameters in bf16 and reduces
gradients in fp32; the sharded master weights and AdamW state stay fp32.

Checkpoints (``torch.distributed.checkpoint``): ``checkpoints/last.dcp/`` (and ``step_N.dcp/``)
hold one ``__<rank>_0.distcp`` file per rank, DCP's ``.metadata``, and ``mimar.pt`` (step,
config, RNG state, git sha and the sha256 of every file, checked on load). DCP stores each
tensor with its global shape and the offsets of each shard, so a checkpoint saved by W ranks
loads on any number of ranks, also on one process without a process group, and
``mimar eval`` / ``mimar export`` read it directly (:func:`read_full`). A save goes to a
``.tmp`` folder renamed into place when every rank has written, so a kill mid-save leaves the
previous checkpoint; periodic saves are written asynchronously (``dcp.async_save`` on a
separate gloo group) while training continues.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import tempfile
import warnings
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from mimar import writes
from mimar.errors import CheckpointError, MissingFileError, WriteError

META = "mimar.pt"  # step, config, rng, git sha and the files' hashes, beside DCP's files
DCP_SUFFIX = ".dcp"


def is_sharded_checkpoint(path: str | Path) -> bool:
    return Path(path).is_dir() and (Path(path) / ".metadata").is_file()


# --- sharding ------------------------------------------------------------------------------


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The outermost ``nn.ModuleList`` entries that hold parameters, in module order."""
    units: list[nn.Module] = []

    def visit(module: nn.Module, inside: bool) -> None:
        for child in module.children():
            if isinstance(module, nn.ModuleList) and not inside and _has_params(child):
                units.append(child)
                visit(child, True)
            else:
                visit(child, inside)

    visit(model, False)
    return units


def _has_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def shard(model: nn.Module, precision: str, device: torch.device) -> int:
    """Shard ``model`` in place over all ranks (FSDP2); returns the number of units."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if precision == "bf16"
        else MixedPrecisionPolicy()
    )
    units = shard_units(model)
    for unit in units:
        fully_shard(unit, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return len(units) + 1


def set_gradient_sync(model: nn.Module, sync: bool) -> None:
    """Skip (False) or do (True) the gradient reduce-scatter of the next backward: the
    accumulation micro-steps before the last one keep unsharded local gradients."""
    model.set_requires_gradient_sync(sync)


def full_model_state(model: nn.Module) -> dict:
    """Every rank takes part; rank 0 gets the whole (unsharded, CPU) model state dict."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


# --- checkpoints ---------------------------------------------------------------------------


class ShardedSaver:
    """Writes the run's DCP checkpoints; at most one asynchronous save is in flight."""

    def __init__(self, model: nn.Module, optimizer, rank: int) -> None:
        self.model, self.optimizer, self.rank = model, optimizer, rank
        self.pending: tuple[Future, Path, list[Path], dict] | None = None
        self.group = dist.new_group(backend="gloo") if dist.is_initialized() else None

    def save(self, meta: dict, paths: list[Path], asynchronous: bool = False) -> None:
        """Write the current state to ``paths[0]`` (and copies to the rest) with ``meta``
        (step, config, rng, ...); ``asynchronous``: return once the state is staged."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        self.wait()
        tmp = _tmp_dir(paths[0])
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        _barrier(self.group)
        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        state = {"model": model_state, "optimizer": optim_state}
        if asynchronous and self.group is not None:
            future = dcp.async_save(state, checkpoint_id=str(tmp), process_group=self.group)
            self.pending = (future, tmp, paths, meta)
            return
        try:
            with _single_process_quiet():
                dcp.save(state, checkpoint_id=str(tmp), process_group=self.group)
        except Exception as err:  # DCP gathers every rank's write errors and raises on all
            raise _save_failed(err, paths[0]) from None
        self._finish(tmp, paths, meta)

    def wait(self) -> None:
        """Finish the save in flight (every rank calls it at the same step)."""
        if self.pending is not None:
            future, tmp, paths, meta = self.pending
            self.pending = None
            try:
                future.result()
            except Exception as err:
                raise _save_failed(err, paths[0]) from None
            self._finish(tmp, paths, meta)

    def _finish(self, tmp: Path, paths: list[Path], meta: dict) -> None:
        _barrier(self.group)  # every rank's file is complete
        failed: CheckpointError | WriteError | None = None
        if self.rank == 0:
            try:
                self._publish(tmp, paths, meta)
            except (CheckpointError, WriteError) as err:
                failed = err
        if _any_rank(failed is not None, self.group):  # every rank stops, none waits
            raise failed or CheckpointError(
                f"rank 0 could not write {paths[0]} (see its error); the previous checkpoint "
                "is intact"
            )

    def _publish(self, tmp: Path, paths: list[Path], meta: dict) -> None:
        """Rank 0: hash the files, write ``mimar.pt``, rename the folder into place."""
        try:
            files = {p.name: _sha256(p) for p in sorted(tmp.iterdir())}
            writes.torch_save({**meta, "files": files}, tmp / META, "checkpoint")
            for extra in paths[1:]:
                extra_tmp = _tmp_dir(extra)
                shutil.rmtree(extra_tmp, ignore_errors=True)
                with writes.guard(extra, "checkpoint"):
                    shutil.copytree(tmp, extra_tmp)
                _replace_dir(extra_tmp, extra)
            _replace_dir(tmp, paths[0])
        except OSError as err:  # a WriteError too: the write layer's line, plus what is kept
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(err, WriteError) and err.errno:  # name the checkpoint, not its .tmp
                err = OSError(err.errno, os.strerror(err.errno))
            raise _intact(writes.explain(err, paths[0], "checkpoint")) from None


@contextmanager
def _single_process_quiet():
    """DCP warns on every save and load without a process group ("assuming the intent is to
    save in a single process"): that is our intent on one process."""
    with warnings.catch_warnings():
        if not dist.is_initialized():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def restore_interrupted(folder: str | Path) -> None:
    """A kill between the two renames of :func:`_replace_dir` leaves ``.X.old.tmp`` and no
    ``X``: put the previous checkpoint back (before the ``*.tmp`` orphans are removed)."""
    for old in Path(folder).glob(".*.dcp.old.tmp"):
        target = old.parent / old.name[1 : -len(".old.tmp")]
        if not target.exists():
            writes.rename(old, target, "checkpoint")


def _tmp_dir(path: Path) -> Path:
    return path.parent / f".{path.name}.tmp"


def _replace_dir(src: Path, dst: Path) -> None:
    """Move folder ``src`` to ``dst``; an old ``dst`` is removed only after the move."""
    old = dst.parent / f".{dst.name}.old.tmp"
    shutil.rmtree(old, ignore_errors=True)
    if dst.exists():
        writes.rename(dst, old, "checkpoint")
    writes.rename(src, dst, "checkpoint")
    shutil.rmtree(old, ignore_errors=True)


# DCP gathers each rank's exception into one CheckpointException: its text names the errno
_DCP_REASONS = {
    "No space left": errno.ENOSPC,
    "Disk quota exceeded": errno.EDQUOT,
    "Read-only file system": errno.EROFS,
    "Permission denied": errno.EACCES,
    "Not a directory": errno.ENOTDIR,
}


def _save_failed(err: Exception, path: Path) -> Exception:
    """A failed ``dcp.save``: the write layer's one line (exit 74) when a rank's write failed
    (DCP's message names the reason), else a CheckpointError with the message's first line."""
    code = next((c for text, c in _DCP_REASONS.items() if text in str(err)), None)
    if code is not None:
        return _intact(writes.explain(OSError(code, os.strerror(code)), path, "checkpoint"))
    if isinstance(err, OSError) or writes.is_write_failure(err):
        return _intact(writes.explain(err, path, "checkpoint"))
    first = (str(err).strip().splitlines() or ["error"])[0]
    return CheckpointError(f"{first[:200]} writing {path}; the previous checkpoint is intact")


def _intact(error: WriteError) -> WriteError:
    return WriteError(f"{error}; the previous checkpoint is intact", errno_=error.errno)


def _any_rank(flag: bool, group) -> bool:
    if not dist.is_initialized():
        return flag
    t = torch.tensor([float(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return bool(t.item())


def _barrier(group) -> None:
    if dist.is_initialized():
        dist.barrier(group=group)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def read_meta(path: str | Path) -> dict:
    """``mimar.pt`` of a sharded checkpoint, after checking every file's hash."""
    path = Path(path)
    if not (path / META).is_file():
        raise CheckpointError(f"{path} is a DCP folder without {META}: not a mimar checkpoint")
    try:
        meta = torch.load(path / META, map_location="cpu", weights_only=True)
    except Exception:
        raise CheckpointError(f"cannot read {path / META} (corrupt or not a torch file)") from None
    for name, digest in meta.get("files", {}).items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete: {name} is missing")
        if _sha256(file) != digest:
            raise CheckpointError(f"checkpoint {path} is corrupt (hash mismatch in {name})")
    return meta


def load_into(path: str | Path, model: nn.Module, optimizer) -> dict:
    """Load a sharded checkpoint into ``model`` and ``optimizer`` (sharded or not, on any
    number of ranks: DCP reads each rank's part of every tensor); returns its meta."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    path = Path(path)
    if not is_sharded_checkpoint(path):
        raise MissingFileError(f"no sharded checkpoint at {path}")
    meta = read_meta(path)
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optim_state}
    try:
        with _single_process_quiet():
            dcp.load(state, checkpoint_id=str(path))
    except Exception as err:  # another model: DCP names the first missing / mismatched key
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"{path} does not fit the model of the config: {first[:300]}"
        ) from None
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"]
    )
    return meta


def read_full(path: str | Path) -> dict:
    """A sharded checkpoint as the dict a single-file checkpoint holds (``model`` the full
    state dict, ``step``, ``config``, ...), read on one process: for eval and export."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    path = Path(path)
    meta = read_meta(path)
    with tempfile.TemporaryDirectory(prefix="mimar-dcp-") as tmp:
        file = Path(tmp) / "full.pt"
        dcp_to_torch_save(str(path), str(file))
        full = torch.load(file, map_location="cpu", weights_only=True)
    meta.pop("files", None)
    return {**meta, "model": full["model"], "optimizer": full.get("optimizer")}
