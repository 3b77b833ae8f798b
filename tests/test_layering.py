"""Imports flow one way (STYLE.md §1): the engine knows no method; loading a ViT run does not
import iTPN; the name tables are the only place that maps names to modules."""

import ast
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


# The layer of every part of mimar/, bottom to top: the one place the order is written
# (DESIGN.md "Layers", which docs/architecture.md shows). A module may import its own layer
# and the layers below it, never a layer above; the whole graph must have no cycle. Two
# refinements of DESIGN.md's order: `factory` (which builds a method with its teacher, handing
# it `loading.teacher_backbone`) sits with `loading`, above `config`; and `evaluation` (frozen
# probes) is a layer of its own below `finetune` / `dense`, so that it never drives training.
LAYERS: tuple[tuple[str, ...], ...] = (
    (
        "errors",
        "runs",
        "writes",
        "streams",
        "interrupts",
        "machine",
        "recipe_yaml",
        "nn",
        "masking",
        "losses",
        "targets",
    ),
    ("data", "teachers", "heads", "names", "engine"),
    ("backbones",),
    ("methods",),
    ("config", "viz"),
    ("loading", "export", "formats", "factory"),
    ("evaluation",),
    ("finetune", "dense", "downstream"),
    ("pretrain", "monitor", "protocols", "bench"),
    ("cli", "__init__"),  # the package's front door re-exports the API below it
)
LAYER_OF = {part: level for level, parts in enumerate(LAYERS, 1) for part in parts}


def _modules() -> dict[str, Path]:
    """Every module of mimar/ by dotted name (a package by its ``__init__``)."""
    mods = {}
    for path in (ROOT / "mimar").rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def _imports(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """The mimar modules ``name`` imports anywhere (in functions too), ``TYPE_CHECKING``
    blocks left out; ``from a.b import c`` counts as an edge to ``a.b.c`` when it is a module,
    else to ``a.b``. Importing a package one sits inside is no edge (Python runs its
    ``__init__`` first anyway)."""
    tree = ast.parse(path.read_text())
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            candidates = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in candidates:
            while target and target not in mods:
                target = target.rpartition(".")[0]
            if target and target != name and not name.startswith(target + "."):
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    mods = _modules()
    return {name: _imports(name, path, mods) for name, path in mods.items()}


def layer_of(module: str) -> int:
    part = module.split(".")[1] if "." in module else "__init__"
    if part not in LAYER_OF:
        raise AssertionError(f"{module} has no layer: add mimar/{part} to LAYERS")
    return LAYER_OF[part]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        top = stack.pop()
                        on_stack.discard(top)
                        component.append(top)
                        if top == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(graph[child]))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return found


def upward_edges(graph: dict[str, set[str]]) -> list[str]:
    return sorted(
        f"{a} (layer {layer_of(a)}) -> {b} (layer {layer_of(b)})"
        for a, targets in graph.items()
        for b in targets
        if layer_of(b) > layer_of(a)
    )


def test_the_import_graph_has_no_cycle():
    assert cycles(import_graph()) == []


def test_no_module_imports_a_layer_above_its_own():
    assert upward_edges(import_graph()) == []


def test_the_graph_rule_sees_imports_inside_functions_and_skips_type_checking(tmp_path):
    """The rule itself: a lazy import is an edge, a ``TYPE_CHECKING`` one is not."""
    mods = {
        "mimar.a": tmp_path / "a.py",
        "mimar.b": tmp_path / "b.py",
        "mimar.c": tmp_path / "c.py",
    }
    mods["mimar.a"].write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from mimar import c\n"
        "def f():\n    from mimar.b import g\n"
    )
    assert _imports("mimar.a", mods["mimar.a"], mods) == {"mimar.b"}
    assert cycles({"x": {"y"}, "y": {"z"}, "z": {"x"}, "w": {"x"}}) == [["x", "y", "z"]]
