"""Per-method knowledge lives in ``names.METHODS``: each entry names its tiny recipe and its
picture; the quality bench, the speed report and the test sweeps take their lists from there,
so that adding a method is its file, one Entry line and its recipes (the toy method of
test_layering.py, benched and speed-reported here with no edit to either); the EMA teacher."""

import json
from pathlib import Path

import pytest
import torch
from test_layering import TOY_METHOD

import mimar
from mimar import names
from mimar.bench import quality, speed
from mimar.cli import main
from mimar.teachers.ema import ema_teacher, ema_update_

ROOT = Path(__file__).resolve().parents[1]
TOY_RECIPE = (
    "method:\n  name: toy\nbackbone:\n  name: vit\n  use_mask_token: true\n"
    "  img_size: 16\n  patch_size: 4\n  in_chans: 1\n  embed_dim: 32\n  depth: 2\n"
    "  num_heads: 2\ndata:\n  name: synthetic\n  synthetic_size: 64\n  img_size: 16\n"
    "  in_chans: 1\n  batch_size: 16\ntrain:\n  steps: 4\n  precision: fp32\n  threads: 1\n"
    "  progress: false\n"
)


def test_every_tiny_recipe_is_its_methods_and_every_picture_resolves():
    recipes = names.tiny_recipes()
    # the bench's names and order from before they moved here (`--methods` takes them)
    earlier = ["simmim", "simmim-swin", "eva", "itpn", "itpn-clip", "aim", "digpt"]
    assert [name for name in recipes if name in earlier] == earlier
    for bench_name, path in recipes.items():
        assert path.is_file() and path.is_relative_to(ROOT / "configs"), path
        method = mimar.load_config(path).method.name
        assert names.method_of_bench_name(bench_name) == method, bench_name
    for name, entry in names.METHODS.items():  # a picture named is a function (None: no picture)
        assert entry.picture_function() is None or callable(entry.picture_function()), name
    assert names.METHODS["simmim"].picture_function().__name__ == "simmim_rows"


def test_the_picture_is_found_from_the_method_without_a_table_of_classes():
    from tiny_methods import BUILDERS

    from mimar import viz

    for name, build in BUILDERS.items():
        method = build()
        assert names.method_entry_of(method) is names.METHODS[name]
        assert viz.picture_for(method) is names.METHODS[name].picture_function()
    assert names.method_entry_of(torch.nn.Linear(2, 2)) is None


@pytest.fixture
def only_the_toy(tmp_path, monkeypatch):
    """The name table holding the toy method alone (its file, one Entry line, its recipe)."""
    (tmp_path / "toy_method.py").write_text(TOY_METHOD)
    monkeypatch.syspath_prepend(str(tmp_path))
    recipe = tmp_path / "toy.yaml"
    recipe.write_text(TOY_RECIPE)
    toy = names.Entry("toy_method", "ToyConfig", "Toy", tiny_recipe=str(recipe))
    monkeypatch.setattr(names, "METHODS", {"toy": toy})
    monkeypatch.setitem(names.TABLES, "method", names.METHODS)
    return recipe


def test_a_new_method_is_in_the_speed_report_with_no_edit_to_it(only_the_toy, tmp_path):
    assert speed.tiny_recipes() == [str(only_the_toy)]
    out = tmp_path / "speed.json"
    argv = ["--steps", "1", "--warmup", "0", "--no-classify", "--json", str(out)]
    assert speed.main(argv) == 0
    (record,) = json.loads(out.read_text())["recipes"]
    assert record["recipe"] == str(only_the_toy)
    assert {row["model"] for row in record["rows"]} == {"toy"}


def test_a_new_method_is_benched_with_no_edit_to_the_bench(only_the_toy, tmp_path):
    """Its default method list holds the toy; a bench of it runs, evaluates and reports, and its
    run is finished without a picture (the toy draws none)."""
    assert quality.QualityConfig().methods == ("toy",)
    out = tmp_path / "bench"
    argv = ["bench", "quality", "--data", "synthetic", "--budget-images", "32", "--protocols"]
    argv += ["knn", "--calibration-steps", "2", "--max-train", "32", "--max-test", "16"]
    assert main([*argv, "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert list(report["method_details"]) == ["toy"]
    run = out / "runs" / "toy-seed0"
    assert not (run / "reconstruction.png").exists()
    assert quality.run_state(run, 2) == "finished"


def test_a_run_is_finished_by_its_last_checkpoint_and_its_last_metrics_row(tmp_path):
    from helpers import DEMO, TINY

    run = tmp_path / "run"
    assert main(["pretrain", DEMO, *TINY, "train.steps=2", "--run-dir", str(run)]) == 0
    (run / "reconstruction.png").unlink()  # the picture is no part of it
    assert quality.run_state(run, 2) == "finished"
    assert quality.run_state(run, 3) == "unfinished"  # a longer budget continues it
    metrics = run / "metrics.jsonl"
    rows = metrics.read_text().splitlines()
    metrics.write_text("\n".join(rows[:-1]) + '\n{"step": 2, "lo')  # killed mid-row
    assert quality.run_state(run, 2) == "unfinished"
    assert quality.run_state(tmp_path / "none", 2) == "missing"


def test_the_ema_update_is_momentum_times_teacher_plus_the_rest_times_student():
    student = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.BatchNorm1d(8))
    teacher = ema_teacher(student)
    assert all(not p.requires_grad for p in teacher.parameters())
    assert all(p.requires_grad for p in student.parameters())
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    student.train()(torch.randn(4, 8))  # moves the BatchNorm running statistics
    before = [p.clone() for p in teacher.parameters()]
    ema_update_(teacher, student, 0.9)
    for t, b, s in zip(teacher.parameters(), before, student.parameters()):
        assert torch.allclose(t, 0.9 * b + 0.1 * s)
        # bit for bit the arithmetic iTPN's numbers were measured with (not timm's lerp)
        assert torch.equal(t, b.mul_(0.9).add_(s, alpha=1 - 0.9))
    for t, s in zip(teacher.buffers(), student.buffers()):
        assert torch.equal(t, s)  # buffers copied, not averaged
