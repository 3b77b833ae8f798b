"""Pictures: every method's rows stay the same pixels (fingerprints on tiny models with fixed
weights and a fixed mask generator)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import images
from tiny_methods import BUILDERS, fixed_weights, simmim

from mimar import names, viz

ROOT = Path(__file__).resolve().parents[1]


def _rows(method, x: torch.Tensor, seed: int = 0) -> dict:
    return viz.reconstruction_rows(method, x, torch.Generator().manual_seed(seed))


def _fingerprint(row: torch.Tensor) -> tuple[float, float]:
    """Sum and a fixed random projection of a row: any changed pixel or moved patch shows."""
    row = row.detach().float()
    w = torch.randn(row.shape, generator=torch.Generator().manual_seed(0))
    return round(row.sum().item(), 4), round((row * w).sum().item(), 4)


def _method_rows(kind: str) -> dict:
    method = fixed_weights(BUILDERS[kind]()).eval()
    return _rows(method, images(2, seed=1))


# every method whose names.METHODS entry names a picture needs its fingerprints here
PICTURED = [name for name, entry in names.METHODS.items() if entry.picture]
# fingerprints of the rows drawn before the picture code moved out of the method files
EXPECTED = {
    "simmim": {
        "original": (-1.3928, -43.7024),
        "masked": (-873.533, -79.0004),
        "reconstruction": (3.482, -3.6517),
    },
    "eva": {
        "original": (-1.3928, -43.7024),
        "masked": (-635.8285, -81.3072),
        "cosine to teacher": (28.0169, -13.897),
    },
    "itpn": {
        "original": (-1.3928, -43.7024),
        "masked": (-1275.7926, -88.7123),
        "reconstruction": (27.6344, -30.7573),
    },
    "itpn_clip": {
        "original": (-1.3928, -43.7024),
        "masked": (-635.0778, -166.5965),
        "cosine to teacher": (-92.2819, 1.5759),
    },
    "aim": {
        "original": (-1.3928, -43.7024),
        "prefix": (-873.4736, -136.9982),
        "next-patch prediction": (-25.2921, -43.6982),
    },
    "digpt": {
        "original": (-1.3928, -43.7024),
        "encoder input": (-228.62, -58.0271),
        "cosine to teacher": (-79.7198, -6.9002),
    },
}
CAPTIONS = {
    "simmim": None,
    "eva": "6 of 16 patches hidden, mean cosine on hidden patches -0.05",
    "itpn": "iTPN: 4 of 16 main patches kept",
    "itpn_clip": "mean on hidden patches -0.20, on visible -0.17",
    "aim": "AIM: prefix = first 8 of 16 patches (spiral order)",
    "digpt": "(mean 0.13)",
}


@pytest.mark.parametrize("kind", PICTURED)
def test_rows_are_the_same_pixels_as_before(kind):
    rows = _method_rows(kind)
    caption = rows.pop("caption", None)
    assert all(r.shape == (2, 1, 16, 16) for r in rows.values())
    got = {title: _fingerprint(row) for title, row in rows.items()}
    assert list(got) == list(EXPECTED[kind])
    for title, values in EXPECTED[kind].items():
        assert got[title] == pytest.approx(values, rel=1e-5, abs=2e-4), title
    if CAPTIONS[kind] is None:
        assert caption is None
    else:
        assert CAPTIONS[kind] in caption


def test_save_reconstruction_writes_a_png_and_keeps_the_training_mode(tmp_path):
    method = simmim().train()
    gen = torch.Generator().manual_seed(0)
    path = viz.save_reconstruction(
        method, images(3), tmp_path / "a" / "rec.png", mean=(0.5,), std=(0.5,), generator=gen
    )
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert method.training


def test_a_method_without_a_picture_is_a_clear_error():
    assert not viz.has_picture(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="Linear has no reconstruction picture"):
        viz.reconstruction_rows(torch.nn.Linear(2, 2), images(1))


def test_importing_and_drawing_select_no_backend_and_the_engine_draws_nothing_on_import(tmp_path):
    code = f"""
import sys, matplotlib, torch
backend = dict.__getitem__(matplotlib.rcParams, "backend")
import mimar.engine.loop
assert "mimar.viz" not in sys.modules, "mimar.engine imports mimar.viz"
from mimar import viz
from mimar.backbones.vit import ViT, ViTConfig
from mimar.methods.simmim import SimMIM, SimMIMConfig
vit = ViT(ViTConfig(img_size=16, patch_size=4, in_chans=1, embed_dim=8, depth=1, num_heads=1,
                    use_mask_token=True))
method = SimMIM(SimMIMConfig(mask_patch_size=8), vit)
viz.save_reconstruction(method, torch.zeros(1, 1, 16, 16), {str(tmp_path / "r.png")!r},
                        mean=(0.0,), std=(1.0,))
assert "matplotlib.pyplot" not in sys.modules, "pyplot imported"
assert dict.__getitem__(matplotlib.rcParams, "backend") == backend, "backend changed"
"""
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}
    env["PYTHONPATH"] = str(ROOT)
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=ROOT)
