"""``mimar eval``: evaluate a backbone with any protocols of :mod:`mimar.protocols`.

Its options are generated from the protocols' option dataclasses
(:func:`mimar.protocols.option_classes`): a protocol's new option is one field there.
"""

from __future__ import annotations

import sys

from mimar.cli.common import add_options, signal_number
from mimar.errors import Stopped


def add_parser(sub) -> None:
    from mimar.protocols import PROTOCOL_TABLE, option_classes, overriding

    ev = sub.add_parser(
        "eval",
        help="evaluate a backbone (kNN, linear and attentive probes, LoRA)",
        description="Evaluate a run's backbone; writes RUN_DIR/eval/<protocol>.json each.",
    )
    by_prefixes: dict[tuple[str, ...], list[str]] = {}
    for name, prefixes in overriding().items():
        by_prefixes.setdefault(prefixes, []).append(name)
    takers = "; ".join(
        f"{', '.join(p + '*' for p in prefixes)} keys ({', '.join(names)})"
        for prefixes, names in by_prefixes.items()
    )
    ev.add_argument(
        "protocols",
        nargs="+",
        metavar="PROTOCOL",
        help="; ".join(f"{name}: {spec.help}" for name, spec in PROTOCOL_TABLE.items())
        + f". Words with '=' override the recipe: {takers}",
    )
    epochs = ", ".join(
        f"{name} {spec.default_epochs}"
        for name, spec in PROTOCOL_TABLE.items()
        if spec.default_epochs is not None
    )
    pixels = "/".join(name for name, spec in PROTOCOL_TABLE.items() if spec.pixel_row)
    suffix = {"epochs": f" (default: {epochs})", "baselines": f" ({pixels} only for pixels)"}
    names = add_options(ev, option_classes(), suffix)
    ev.set_defaults(func=run, extra="protocols", option_names=names)


def run(args) -> int:
    from mimar.protocols import evaluate, request

    words = args.protocols  # protocols, then any key=value overrides
    values = {name: getattr(args, name) for name in args.option_names}
    made = request([w for w in words if "=" not in w], [w for w in words if "=" in w], **values)
    try:
        evaluate(made)
    except Stopped as stop:  # nothing written for the stopped protocol; --resume continues it
        print(f"mimar eval: {stop}; continue with the same command and --resume", file=sys.stderr)
        return 128 + signal_number(stop.signal_name)
    return 0
