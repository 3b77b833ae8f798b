"""``mimar bench quality``: the budget planner, the noise rule, a tiny two-method bench (its
report files and numbers) and resuming a killed bench."""

import json
import math
import shlex
import shutil
import sys
import types

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mimar.bench
from mimar.bench.quality import plan_steps
from mimar.bench.report import mark_noise, mean_std
from mimar.cli import main

# Every method: 16 px synthetic images, width 32, depth 2; 6 steps of 16 images (checkpoints
# at 2 and 4), kNN on 48 / 32 images.
TINY_SET = [
    "data.synthetic_size=64",
    "data.batch_size=16",
    "data.img_size=16",
    "backbone.img_size=16",
    "backbone.embed_dim=32",
    "backbone.depth=2",
    "backbone.num_heads=2",
    "train.precision=fp32",
    "train.threads=1",
    "train.checkpoint_every=2",
    "simmim:method.mask_patch_size=8",
    "aim:method.head_width=32",
    "aim:method.head_depth=1",
]
BENCH = ["bench", "quality", "--methods", "simmim,aim", "--seeds", "2", "--protocols", "knn"]
BENCH += ["--data", "synthetic", "--budget-images", "96", "--calibration-steps", "3"]
BENCH += ["--max-train", "48", "--max-test", "32", "--set", *TINY_SET]
RUNS = ("simmim-seed0", "aim-seed0", "simmim-seed1", "aim-seed1")
REPORT_FILES = ("report.md", "report.json", "accuracy.png", "loss_vs_time.png", "pictures.png")


# --- the planner -----------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    budget=st.floats(1.0, 1e5),
    fast=st.floats(1e-3, 10.0),
    slow_factor=st.floats(1.0, 50.0),
    batch=st.integers(1, 512),
)
def test_equal_time_budgets_give_steps_inversely_proportional_to_step_time(
    budget, fast, slow_factor, batch
):
    slow = fast * slow_factor
    n_fast = plan_steps(seconds_per_step=fast, images_per_step=batch, budget_seconds=budget)
    n_slow = plan_steps(seconds_per_step=slow, images_per_step=batch, budget_seconds=budget)
    assert n_fast >= n_slow >= 1
    for n, step in ((n_fast, fast), (n_slow, slow)):
        # the steps fit in the budget, and one more would not (unless 1 step is already over)
        assert n * step <= budget * (1 + 1e-9) or n == 1
        assert (n + 1) * step > budget * (1 - 1e-9)
    if n_slow >= 10:  # inversely proportional up to the rounding of one step each
        assert n_fast / n_slow == pytest.approx(slow_factor, rel=0.25)


@settings(max_examples=200, deadline=None)
@given(
    images=st.integers(1, 10**7),
    batches=st.lists(st.integers(1, 4096), min_size=2, max_size=6),
    step_times=st.lists(st.floats(1e-3, 10.0), min_size=6, max_size=6),
)
def test_an_image_budget_gives_every_method_the_same_images(images, batches, step_times):
    for batch, seconds in zip(batches, step_times):
        steps = plan_steps(seconds_per_step=seconds, images_per_step=batch, budget_images=images)
        assert steps >= 1
        if images >= batch:  # within one batch of the budget, never above it
            assert images - batch < steps * batch <= images
        else:
            assert steps == 1
    # the same batch: exactly the same number of images whatever the step time
    same = {
        plan_steps(seconds_per_step=t, images_per_step=batches[0], budget_images=images)
        for t in step_times
    }
    assert len(same) == 1


def test_the_planner_takes_exactly_one_budget():
    with pytest.raises(ValueError, match="exactly one"):
        plan_steps(seconds_per_step=1.0, images_per_step=8)
    with pytest.raises(ValueError, match="exactly one"):
        plan_steps(seconds_per_step=1.0, images_per_step=8, budget_seconds=1, budget_images=8)


# --- the noise rule --------------------------------------------------------------------------


def test_mean_std_uses_the_sample_std_and_no_std_for_one_seed():
    s = mean_std([70.0, 72.0, 74.0])
    assert s["mean"] == 72.0 and s["std"] == pytest.approx(2.0)  # N - 1
    assert mean_std([70.0])["std"] is None


def test_within_noise_of_the_best_is_mean_gap_at_most_the_summed_stds():
    stats = {
        "a": mean_std([80.0, 82.0]),  # best: 81 ± 1.41
        "b": mean_std([79.0, 80.0]),  # 79.5 ± 0.71: gap 1.5 <= 2.12 -> within noise
        "c": mean_std([70.0, 71.0]),  # gap 10.5 -> not
    }
    mark_noise(stats)
    assert stats["a"]["best"] and not stats["a"]["within_noise"]
    assert stats["b"]["within_noise"] and not stats["b"]["best"]
    assert not stats["c"]["within_noise"]
    single = {"a": mean_std([80.0]), "b": mean_std([79.9])}
    mark_noise(single)
    assert single["a"]["best"] and not single["b"]["within_noise"]  # one seed: no noise mark


# --- the bench end to end --------------------------------------------------------------------


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "out"
    assert main([*BENCH, "--out", str(out)]) == 0
    return out


def _eval(run_dir, protocol="knn"):
    return json.loads((run_dir / "eval" / f"{protocol}.json").read_text())


def test_the_bench_writes_every_report_file_with_each_runs_own_numbers(bench):
    for name in REPORT_FILES:
        assert (bench / name).stat().st_size > 0, name
    report = json.loads((bench / "report.json").read_text())
    assert report["methods"] == ["simmim", "aim"] and report["seeds"] == [0, 1]
    assert report["planned_steps"] == {"simmim": 6, "aim": 6}  # 96 images / 16 per step
    for name in RUNS:
        run_dir = bench / "runs" / name
        rows = {r["model"]: r["top1"] for r in _eval(run_dir)["rows"]}
        assert set(rows) == {"pretrained", "random init", "raw pixels"}  # with baselines
        assert report["runs"][name]["eval"]["knn"] == rows
        assert torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["step"] == 6
    for method in ("simmim", "aim"):
        values = [report["runs"][f"{method}-seed{k}"]["eval"]["knn"]["pretrained"] for k in (0, 1)]
        stats = report["summary"]["knn"]["methods"][method]
        assert stats["values"] == values
        assert stats["mean"] == pytest.approx(sum(values) / 2)
        assert stats["std"] == pytest.approx(abs(values[0] - values[1]) / math.sqrt(2))
    text = (bench / "report.md").read_text()
    assert "| simmim |" in text and "| aim |" in text and "±" in text
    assert "mimar pretrain" in text and "--run-dir" in text and "torch" in text


def test_a_cells_command_reproduces_its_run(bench, tmp_path):
    report = json.loads((bench / "report.json").read_text())
    pretrain = shlex.split(report["runs"]["aim-seed1"]["commands"][0])
    assert pretrain[:2] == ["mimar", "pretrain"] and "train.seed=1" in pretrain
    assert pretrain[-2:] == ["--run-dir", str(bench / "runs" / "aim-seed1")]
    again = tmp_path / "again"
    argv = [*pretrain[1:-1], str(again), "train.progress=false"]
    assert main(argv) == 0
    first = (bench / "runs" / "aim-seed1" / "metrics.jsonl").read_text().splitlines()
    second = (again / "metrics.jsonl").read_text().splitlines()
    rows = [[json.loads(line) for line in lines] for lines in (first, second)]
    losses = [[r["loss"] for r in run if "loss" in r] for run in rows]  # not the monitor's rows
    assert losses[0] == pytest.approx(losses[1])


def _stamps(folder):
    return {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.rglob("*") if p.is_file()}


def test_resume_after_a_killed_bench_redoes_only_the_unfinished_part(bench, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(bench, out)  # copy2: modification times are kept
    runs = out / "runs"
    # simmim-seed1 was killed after its step-4 checkpoint (before drawing and evaluating);
    # aim-seed1 was killed during its evaluation
    killed = runs / "simmim-seed1"
    before = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()]
    before = [r for r in before if "loss" in r]  # the training rows (not the monitor's)
    shutil.copy(killed / "checkpoints" / "step_0000004.pt", killed / "checkpoints" / "last.pt")
    (killed / "reconstruction.png").unlink()
    shutil.rmtree(killed / "eval")
    (runs / "aim-seed1" / "eval" / "knn.json").unlink()
    kept = {
        **_stamps(runs / "simmim-seed0"),
        **_stamps(runs / "aim-seed0"),
        **_stamps(runs / "aim-seed1" / "checkpoints"),
        **_stamps(out / "calibration"),
        out / "calibration.json": _stamps(out)[out / "calibration.json"],
    }

    assert main(["bench", "quality", "--out", str(out), "--resume"]) == 0

    assert {p: v for p, v in _stamps(out).items() if p in kept} == kept  # untouched
    after = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()]
    after = [r for r in after if "loss" in r]
    assert [r["step"] for r in after] == [1, 2, 3, 4, 5, 6]  # continued, no step twice
    assert [r["loss"] for r in after] == pytest.approx([r["loss"] for r in before])  # exact
    assert (killed / "reconstruction.png").is_file()
    report = json.loads((out / "report.json").read_text())
    for name in ("simmim-seed1", "aim-seed1"):
        rows = {r["model"]: r["top1"] for r in _eval(runs / name)["rows"]}
        assert report["runs"][name]["eval"]["knn"] == rows


def test_a_used_out_folder_needs_resume_and_resume_keeps_the_settings(bench, capsys):
    assert main([*BENCH, "--out", str(bench)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--resume" in err
    assert main(["bench", "quality", "--out", str(bench), "--resume", "--seeds", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "seeds=2" in err


def test_an_unknown_method_is_a_one_line_error_listing_the_valid_ones(tmp_path, capsys):
    assert main(["bench", "quality", "--methods", "simmim,mae", "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "mae" in err
    for name in ("simmim", "simmim-swin", "eva", "itpn", "aim", "digpt"):
        assert name in err
    assert not (tmp_path / "b").exists()


def test_bench_speed_forwards_every_argument(monkeypatch):
    seen = []
    fake = types.ModuleType("mimar.bench.speed")
    fake.main = lambda argv: seen.append(argv) or 0
    monkeypatch.setitem(sys.modules, "mimar.bench.speed", fake)
    monkeypatch.setattr(mimar.bench, "speed", fake, raising=False)
    assert main(["bench", "speed", "--steps", "3", "--peers", "backbone.depth=2", "--help"]) == 0
    assert seen == [["--steps", "3", "--peers", "backbone.depth=2", "--help"]]
