"""``mimar export`` (the backbone to another library) and ``mimar visualize`` (a run's
reconstruction picture): what a run leaves behind for others."""

from __future__ import annotations

from dataclasses import replace

from mimar.errors import ConfigError


def add_parser(sub) -> None:
    ex = sub.add_parser("export", help="export the backbone to another library")
    ex.add_argument("--checkpoint", required=True, help="run folder or checkpoint file")
    ex.add_argument("--format", default="timm", help="timm, or a release format of `mimar import`")
    ex.add_argument("--out", required=True, help="FILE.safetensors (FILE.json is written beside)")
    ex.set_defaults(func=export)

    vi = sub.add_parser("visualize", help="draw original / masked / reconstruction rows")
    vi.add_argument("--checkpoint", required=True, help="run folder or checkpoint file")
    vi.add_argument("--out", required=True, help="output PNG")
    vi.add_argument(
        "--data",
        default=None,
        help="KIND:PATH (image_folder:DIR, fashion_mnist:DIR, webdataset:PATTERN) as in mimar "
        "eval, or a plain root of the run's data set (default: the run's data.root)",
    )
    vi.add_argument("--split", choices=["train", "test"], default="test")
    vi.add_argument("--num", type=int, default=8, help="number of images")
    vi.add_argument("--seed", type=int, default=0, help="seed of the masks drawn")
    vi.add_argument(
        "teacher",
        nargs="*",
        metavar="teacher.KEY=VALUE",
        help="another teacher for an EVA / D-iGPT / iTPN-CLIP run's picture (e.g. an imported "
        "release's: teacher.kind=mimar teacher.path=RUN)",
    )
    vi.set_defaults(func=visualize, extra="teacher")  # key=value words after the options


def export(args) -> int:
    from mimar.export import export_timm
    from mimar.finetune.run import load_for_export

    if args.format != "timm":  # a paper's release layout (mimar.formats)
        from mimar.formats.importing import export_release

        print(f"wrote {export_release(args.checkpoint, args.format, args.out)}")
        return 0
    out, meta = export_timm(load_for_export(args.checkpoint), args.out)
    print(f"wrote {out} and {meta}")
    return 0


def visualize(args) -> int:
    import torch

    from mimar.data import iterate_eval_batches, load_images
    from mimar.data.eval_data import data_for_backbone, parse_data_spec
    from mimar.factory import load_method
    from mimar.viz import has_picture, save_reconstruction

    cfg, method = load_method(args.checkpoint, args.teacher)
    if not has_picture(method):
        raise ConfigError(f"{type(method).__name__} has no reconstruction picture")
    spec = parse_data_spec(args.data)
    if spec is not None:  # KIND:PATH, as `mimar eval --data`: fitted to the backbone
        data, note = data_for_backbone(cfg.data, *spec)
        print(note)
    else:
        data = cfg.data if args.data is None else replace(cfg.data, root=args.data)
    images = load_images(replace(data, max_images=args.num), args.split)
    batch, _ = next(iter(iterate_eval_batches(images, data.img_size, args.num)))
    generator = torch.Generator().manual_seed(args.seed)
    path = save_reconstruction(
        method, batch, args.out, mean=images.mean, std=images.std, generator=generator
    )
    print(f"wrote {path}")
    return 0
