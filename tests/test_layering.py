"""Imports flow one way (STYLE.md §1): the engine knows no method; loading a ViT run does not
import iTPN; the name tables are the only place that maps names to modules."""

import subprocess
import sys
from pathlib import Path

import pytest
from helpers import DEMO, TINY

import mimar
from mimar import names
from mimar.cli import main
from mimar.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def _modules_after(code: str) -> set[str]:
    """The mimar modules a fresh interpreter holds after running ``code``."""
    script = f"{code}\nimport sys\nprint(' '.join(m for m in sys.modules if m.startswith('mimar')))"
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return set(out.stdout.split())


def test_engine_imports_no_method():
    loaded = _modules_after("import mimar.engine.loop, mimar.engine.optim, mimar.factory")
    assert "mimar.engine.loop" in loaded
    assert not [m for m in loaded if m.startswith("mimar.methods")], loaded


def test_loading_a_vit_run_does_not_import_itpn(tmp_path):
    run = tmp_path / "run"
    assert main(["pretrain", DEMO, *TINY, "train.steps=1", "--run-dir", str(run)]) == 0
    loaded = _modules_after(f"import mimar; mimar.load_backbone({str(run)!r})")
    assert "mimar.methods.simmim" in loaded  # the run's own method config
    assert "mimar.methods.itpn" not in loaded and "mimar.methods.eva" not in loaded


def test_building_a_vit_imports_neither_timm_nor_torchvision():
    """They cost ~2.5 s of every command's start-up on 2 cores (mimar.nn.init.trunc_normal_)."""
    code = f"import mimar; mimar.build_backbone(mimar.load_config({DEMO!r}, []).backbone)"
    script = f"{code}\nimport sys\nprint(' '.join(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True
    )
    loaded = set(out.stdout.split())
    assert "timm" not in loaded and "torchvision" not in loaded


@pytest.mark.parametrize("kind", ["method", "backbone"])
def test_every_table_entry_resolves(kind):
    for name, entry in names.TABLES[kind].items():
        config = entry.config_class()
        assert config().name == name  # the dataclass's name field agrees with its table key
        assert isinstance(entry.module_class(), type)


def test_unknown_names_list_the_table():
    with pytest.raises(ConfigError, match=r"unknown method 'mae'; choose one of \['aim'"):
        mimar.load_config(DEMO, ["method.name=mae"])
    with pytest.raises(ConfigError, match=r"unknown backbone 'resnet'"):
        mimar.load_config(DEMO, ["backbone.name=resnet"])


TOY_METHOD = '''
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from mimar.engine.contracts import MethodDefaults


@dataclass(frozen=True, kw_only=True)
class ToyConfig:
    name: Literal["toy"] = "toy"
    mask_ratio: float = 0.5


class Toy(MethodDefaults, nn.Module):
    """Predict hidden patch embeddings' pixels with a linear head: a method in one file."""

    def __init__(self, cfg, backbone):
        super().__init__()
        self.cfg, self.backbone = cfg, backbone
        self.head = nn.Linear(backbone.embed_dim, backbone.patch_size**2 * backbone.in_chans)

    def sample_corruption(self, batch_size, generator=None):
        noise = torch.rand(batch_size, self.backbone.num_patches, generator=generator)
        return {"mask": noise < self.cfg.mask_ratio}

    def forward(self, images, *, mask):
        tokens = self.backbone(images, mask=mask)["tokens"][:, self.backbone.num_prefix_tokens :]
        p = self.backbone.patch_size
        target = nn.functional.unfold(images, p, stride=p).transpose(1, 2)  # (B, N, p*p*C)
        loss = ((self.head(tokens) - target) ** 2).mean(-1)[mask].mean()
        return {"loss": loss}
'''


def test_a_new_method_is_one_table_line_its_file_and_its_recipe(tmp_path, monkeypatch):
    (tmp_path / "toy_method.py").write_text(TOY_METHOD)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(names.METHODS, "toy", names.Entry("toy_method", "ToyConfig", "Toy"))
    recipe = tmp_path / "toy.yaml"
    recipe.write_text(
        "method:\n  name: toy\nbackbone:\n  name: vit\n  use_mask_token: true\n"
        "  img_size: 16\n  patch_size: 4\n  in_chans: 1\n  embed_dim: 32\n  depth: 2\n"
        "  num_heads: 2\ndata:\n  name: synthetic\n  synthetic_size: 64\n  img_size: 16\n"
        "  in_chans: 1\n  batch_size: 16\ntrain:\n  steps: 4\n  progress: false\n"
    )
    run = tmp_path / "run"
    assert main(["pretrain", str(recipe), "--run-dir", str(run)]) == 0
    assert (run / "checkpoints" / "last.pt").exists()
    assert main(["eval", "knn", "--checkpoint", str(run), "--baselines"]) == 0
    assert (run / "eval" / "knn.json").exists()
