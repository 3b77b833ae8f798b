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
