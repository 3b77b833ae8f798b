"""What the command groups share: argument types, options generated from dataclasses, the
exit code of a signal, logging set-up."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal


def add_options(
    parser: argparse.ArgumentParser,
    classes: Iterable[type],
    help_suffix: Mapping[str, str] | None = None,
) -> list[str]:
    """One option per field of the dataclasses ``classes`` (a field several of them declare:
    once, as the first declares it); returns the field names (the options' ``dest``).

    A field's metadata (:func:`mimar.evaluation.options.option`) gives its ``help``, and may
    give its ``flag`` (default ``--field-name``; a bool that defaults to True: ``--no-...``)
    and a ``parse`` function; else the annotation decides: bool -> a switch, a ``Literal`` ->
    its choices, int / float / str (None allowed) -> that type. ``help_suffix[name]`` is
    appended to a field's help.
    """
    names: list[str] = []
    for cls in classes:
        hints = typing.get_type_hints(cls)
        for field in dataclasses.fields(cls):
            if field.name in names:
                continue
            names.append(field.name)
            meta = field.metadata
            flag = meta.get("flag") or "--" + field.name.replace("_", "-")
            kwargs: dict[str, Any] = {"dest": field.name, "help": meta.get("help", "")}
            kwargs["help"] += (help_suffix or {}).get(field.name, "")
            if field.default is dataclasses.MISSING:
                kwargs["required"] = True
            else:
                kwargs["default"] = field.default
            kind = _without_none(hints[field.name])
            if kind is bool:
                kwargs["action"] = "store_false" if field.default else "store_true"
                if field.default and not meta.get("flag"):
                    flag = "--no-" + field.name.replace("_", "-")
            elif meta.get("parse") is not None:
                kwargs["type"] = argument_type(meta["parse"])
            elif typing.get_origin(kind) is Literal:
                kwargs["choices"] = typing.get_args(kind)
            elif kind in (int, float):
                kwargs["type"] = kind
            elif meta.get("metavar"):
                kwargs["metavar"] = meta["metavar"]
            parser.add_argument(flag, **kwargs)
    return names


def _without_none(hint: Any) -> Any:
    """``int | None`` -> int; ``str | Path`` -> str (the command line gives strings)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0] if len(args) == 1 or str in args else hint
    return hint


def argument_type(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """``parse`` as an argparse type: its ValueError becomes argparse's one-line error."""

    def convert(value: str) -> Any:
        try:
            return parse(value)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    convert.__name__ = parse.__name__
    return convert


def name_list(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


def float_pair(value: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LO,HI, got {value!r}") from None
    return lo, hi


def signal_number(name: str) -> int:
    """SIGTERM -> 15; a stop another rank saw (its signal unknown here) counts as SIGTERM."""
    import signal

    return int(getattr(signal, name, signal.SIGTERM))


def setup_logging() -> None:
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format="%(asctime)s %(message)s",
        datefmt="%H:%M:%S",
    )
