"""Read a released checkpoint safely: torch pickles, safetensors, Hugging Face folders.

Released ``.pth`` files pickle more than tensors (SimMIM's yacs ``CfgNode``, an
``argparse.Namespace``, numpy scalars). They are read with ``torch.load(weights_only=True)``
only, never ``weights_only=False``: before loading, every global the pickle names is listed
(``pickletools``, nothing is run). A global from a module that can run code (``os.system``,
``builtins.eval``, ``subprocess``...) refuses the file in one line. Argparse namespaces, numpy
scalars and ``OrderedDict`` load as themselves; any other class (a config object) is handed to
the unpickler as an inert :class:`Placeholder` that only stores what it is given, so no
foreign code is imported or run. A placeholder where a tensor should be is an error later.
"""

from __future__ import annotations

import argparse
import io
import json
import pickle
import pickletools
import warnings
import zipfile
from collections import OrderedDict
from pathlib import Path

import torch

from mimar.errors import CheckpointError, MissingFileError

# Modules whose functions can run code, touch files or import more: a pickle naming any of
# them is refused outright (a placeholder would be inert too, but such a file is hostile).
_HOSTILE = {
    "os", "posix", "nt", "subprocess", "sys", "builtins", "__builtin__", "shutil", "importlib",
    "runpy", "pickle", "_pickle", "marshal", "code", "codeop", "pty", "socket", "ctypes",
    "webbrowser", "platform", "multiprocessing", "threading", "asyncio", "types", "functools",
    "operator", "pathlib", "io", "tempfile", "signal", "torch", "numpy", "pydoc", "timeit",
}  # fmt: skip
# numpy scalars, arrays and dtypes, as released checkpoints pickle them (numpy 1 names its
# core ``numpy.core``, numpy 2 ``numpy._core``): the only numpy globals accepted
_NUMPY_CORE = ("scalar", "_reconstruct")

HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")  # save_pretrained's file names


class Placeholder:
    """Stands in for a class the pickle names but that is not loaded (a config object): it
    becomes an ``OrderedDict`` of the items the pickle gives it, its attributes in
    ``__dict__`` and the class name in ``placeholder_for`` (an ``OrderedDict``, because the
    safe unpickler fills and builds only those; no method of the original class ever runs)."""

    qualname = "?"

    def __new__(cls, *args, **kwargs) -> OrderedDict:  # type: ignore[misc]
        inert = OrderedDict()
        inert.__dict__.update(placeholder_for=cls.qualname, args=args)
        return inert


def read_release(path: str | Path) -> tuple[dict, Path]:
    """The top-level object of a release (a dict) and the weights file it came from.

    ``path`` is a ``.safetensors`` file, a torch file (``.pth``, ``.pt``, ``.bin``, zip or
    legacy pickle), or a ``save_pretrained`` folder (``config.json`` + one of
    :data:`HF_WEIGHTS`; the config's keys go under ``"hf_config"``).
    """
    path = Path(path)
    if path.is_dir():
        return _read_hf_folder(path)
    if not path.is_file():
        raise MissingFileError(f"no checkpoint file or folder at {path}")
    if path.suffix == ".safetensors":
        return read_safetensors(path), path
    return read_torch(path), path


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, memory-mapped (one tensor read at a time)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(
            f"cannot read {path} as safetensors (truncated or not one: {err})"
        ) from None


def read_torch(path: Path) -> dict:
    """A torch file's object, read with ``weights_only=True`` after its globals were checked."""
    placeholders = _check_globals(path)
    safe = [(obj, name) for name, obj in _plain_data().items()]
    safe += [(cls, cls.qualname) for cls in placeholders]
    try:
        with torch.serialization.safe_globals(safe), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            mmap = zipfile.is_zipfile(path)  # zip files: tensors stay on disk until used
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{path}: refused by the safe unpickler ({_unpickler_reason(err)})"
        ) from None
    except Exception as err:  # truncated zip, a file of another kind
        raise CheckpointError(
            f"cannot read {path} (truncated, corrupt or not a torch file: {_first_line(err)})"
        ) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a dict of weights")
    return state


def _check_globals(path: Path) -> list[type]:
    """Refuse a pickle that names a code-running global; a placeholder class for each other
    global that is not plain data (numpy scalars, namespaces, torch's own allowed ones)."""
    allowed = set(torch._weights_only_unpickler._get_allowed_globals()) | set(_plain_data())
    placeholders = []
    for name in sorted(_pickle_globals(path)):
        if name in allowed:
            continue
        if name.split(".")[0] in _HOSTILE:
            raise CheckpointError(
                f"{path}: refused: its pickle would call {name} (a file that runs code when "
                "loaded); nothing was loaded or run"
            )
        placeholders.append(type("Placeholder", (Placeholder,), {"qualname": name}))
    return placeholders


def _plain_data() -> dict[str, object]:
    """The globals besides torch's own that load as themselves: namespaces and numpy data."""
    import numpy as np

    core = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    out: dict[str, object] = {"argparse.Namespace": argparse.Namespace}
    for name in _NUMPY_CORE:
        for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
            out[f"{module}.{name}"] = getattr(core, name)
    out |= {"numpy.ndarray": np.ndarray, "numpy.dtype": np.dtype}
    for name in dir(np.dtypes):  # dtype classes: numpy.dtypes.Float64DType, ...
        if name.endswith("DType"):
            out[f"numpy.dtypes.{name}"] = getattr(np.dtypes, name)
    return out


def _pickle_globals(path: Path) -> set[str]:
    """The ``module.name`` of every GLOBAL / STACK_GLOBAL in the file's pickles, read with
    ``pickletools`` (disassembly: nothing is imported or called)."""
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                name = next((n for n in archive.namelist() if n.endswith("data.pkl")), None)
                if name is None:
                    raise CheckpointError(f"{path} is a zip file but not a torch checkpoint")
                streams = [io.BytesIO(archive.read(name))]
        except (zipfile.BadZipFile, OSError) as err:
            raise CheckpointError(f"cannot read {path} (truncated or corrupt zip: {err})") from None
        found: set[str] = set()
        _scan_one(streams[0], found)
        return found
    found = set()
    with path.open("rb") as stream:  # a legacy torch file (pickles, then raw bytes) or a pickle
        if not _scan_one(stream, found):
            raise CheckpointError(f"cannot read {path}: not a torch file (nor a pickle)")
        for _ in range(4):  # legacy: magic number, protocol, sys info, the object, storage keys
            if not _scan_one(stream, found):
                break
    return found


def _scan_one(stream, found: set[str]) -> bool:
    """Add the globals of the next pickle in ``stream``; False when there is none."""
    strings: list[str | None] = []  # what each push left on top (None: not a string)
    memo: dict[int, str | None] = {}
    try:
        for op, arg, _ in pickletools.genops(stream):
            if op.name == "GLOBAL":
                found.add(arg.replace(" ", ".", 1))
            elif op.name == "STACK_GLOBAL":
                module, name = strings[-2:] if len(strings) >= 2 else [None, None]
                # an unresolved name is refused below (its module is not a known one)
                found.add(f"{module}.{name}" if module and name else "builtins.unresolved")
                strings.append(None)
            elif op.name in ("MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT"):
                memo[len(memo) if op.name == "MEMOIZE" else arg] = strings[-1] if strings else None
            elif op.name in ("GET", "BINGET", "LONG_BINGET"):
                strings.append(memo.get(arg))
            else:
                strings.append(arg if isinstance(arg, str) and "UNICODE" in op.name else None)
    except ValueError:  # not a pickle (any more): torch.load says what it is
        return False
    return True


def _read_hf_folder(folder: Path) -> tuple[dict, Path]:
    config = folder / "config.json"
    weights = next((folder / n for n in HF_WEIGHTS if (folder / n).is_file()), None)
    if not config.is_file() or weights is None:
        raise MissingFileError(
            f"{folder} is not a save_pretrained folder: it needs config.json and one of "
            f"{', '.join(HF_WEIGHTS)}"
        )
    state = read_release(weights)[0]
    try:
        hf_config = json.loads(config.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{config} is not valid JSON ({err})") from None
    return {**state, "hf_config": hf_config}, weights


def _unpickler_reason(err: BaseException) -> str:
    """The reason in torch's paragraph-long weights-only error (the line after its marker)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    for k, line in enumerate(lines):
        if "WeightsUnpickler error" in line:
            rest = line.split("WeightsUnpickler error:", 1)[1].strip()
            return (rest or (lines[k + 1] if k + 1 < len(lines) else ""))[:300]
    return _first_line(err)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return (text.splitlines()[0] if text else type(err).__name__)[:300]
