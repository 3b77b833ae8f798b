"""``mimar import``: a released checkpoint (a paper's, timm's, Hugging Face's) -> a run folder.

The way back is ``mimar export --format <release format>`` (``cli/export.py``); both call
:mod:`mimar.formats`.
"""

from __future__ import annotations


def add_parser(sub) -> None:
    from mimar.formats import FORMATS

    im = sub.add_parser("import", help="a released checkpoint (paper, timm, HF) -> a run folder")
    im.add_argument("source", metavar="FILE|FOLDER", help="the release (.pth, .safetensors, ...)")
    im.add_argument("--format", default="auto", choices=["auto", *FORMATS])
    im.add_argument("--recipe", help="recipe YAML for what the weights cannot tell")
    im.add_argument("--img-size", type=int, help="resample the position tables to this size")
    im.add_argument("--out", required=True, help="the run folder to write")
    im.add_argument("overrides", nargs="*", help="dotted.key=value, e.g. backbone.num_heads=4")
    im.set_defaults(func=run, extra="overrides")  # key=value words after options: overrides


def run(args) -> int:
    from mimar.formats.importing import import_release

    import_release(args.source, args.out, args.format, args.recipe, args.img_size, args.overrides)
    return 0
