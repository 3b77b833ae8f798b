"""What ``mimar eval`` reads and where its results land: a run folder, a ``.pt`` checkpoint,
an FSDP ``.dcp`` checkpoint folder (results in RUN/eval/, never inside the checkpoint, which
the next save would delete) and a ``mimar export`` ``.safetensors`` (eval/ beside the file);
and the eval command line generated from the protocols' option dataclasses."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import DEMO, TINY

from mimar.cli import build_parser, main
from mimar.evaluation.runner import eval_dir

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--max-train", "64", "--max-test", "32", "--no-feature-cache"]


@pytest.fixture(scope="module")
def pt_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("pt") / "run"
    assert main(["pretrain", DEMO, *TINY, "train.steps=2", "--run-dir", str(run)]) == 0
    return run


@pytest.fixture(scope="module")
def dcp_run(tmp_path_factory):
    """A one-process fsdp run: its checkpoints are real DCP folders (as in test_fsdp.py)."""
    run = tmp_path_factory.mktemp("dcp") / "run"
    argv = ["pretrain", DEMO, *TINY, "train.steps=2", "train.strategy=fsdp", "--run-dir", str(run)]
    assert main(argv) == 0
    assert (run / "checkpoints" / "last.dcp").is_dir()
    return run


def _top1(path: Path) -> float:
    return json.loads(path.read_text())["rows"][0]["top1"]


def test_eval_dir_follows_the_one_run_folder_rule(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / "last.dcp").mkdir(parents=True)
    (run / "checkpoints" / "last.pt").write_bytes(b"")
    (tmp_path / "b.safetensors").write_bytes(b"")
    assert eval_dir(run) == run / "eval"
    assert eval_dir(run / "checkpoints" / "last.pt") == run / "eval"
    assert eval_dir(run / "checkpoints" / "last.dcp") == run / "eval"
    assert eval_dir(run / "checkpoints" / "step_0000002.dcp") == run / "eval"  # even if gone
    assert eval_dir(tmp_path / "b.safetensors") == tmp_path / "eval"


def test_a_pt_checkpoint_and_its_run_folder_give_the_same_result(pt_run):
    assert main(["eval", "knn", "--checkpoint", str(pt_run), *SMALL]) == 0
    by_folder = _top1(pt_run / "eval" / "knn.json")
    ckpt = pt_run / "checkpoints" / "last.pt"
    assert main(["eval", "knn", "--checkpoint", str(ckpt), *SMALL]) == 0
    assert _top1(pt_run / "eval" / "knn.json") == by_folder
    assert not (pt_run / "checkpoints" / "eval").exists()


def test_a_dcp_checkpoint_writes_into_the_runs_eval_folder(dcp_run):
    last = dcp_run / "checkpoints" / "last.dcp"
    inside = {p.name for p in last.iterdir()}
    assert main(["eval", "knn", "--checkpoint", str(last), "--max-train", "64"]) == 0
    assert (dcp_run / "eval" / "knn.json").is_file()
    assert {p.name for p in last.iterdir()} == inside  # nothing written into the checkpoint
    assert not (dcp_run / "checkpoints" / "eval").exists()
    assert json.loads((dcp_run / "eval" / "knn.json").read_text())["checkpoint"] == str(last)


FMNIST = "/usr/share/datasets/fashion-mnist"


@pytest.mark.skipif(not Path(FMNIST).is_dir(), reason="Fashion-MNIST is not installed here")
def test_an_exported_backbone_is_evaluated_with_results_beside_it(tmp_path):
    """knn/linear of a `mimar export` file: Fashion-MNIST at the backbone's size by default,
    results in eval/ beside the file, and the same kNN top-1 as the run it came from (an fp32
    run on Fashion-MNIST: the same images, normalisation and features)."""
    run = tmp_path / "run"
    words = [*TINY, "data.name=fashion_mnist", f"data.root={FMNIST}", "data.max_images=64"]
    assert main(["pretrain", DEMO, *words, "train.steps=1", "--run-dir", str(run)]) == 0
    out = tmp_path / "export" / "backbone.safetensors"
    assert main(["export", "--checkpoint", str(run), "--out", str(out)]) == 0
    small = ["--max-train", "200", "--max-test", "50", "--no-feature-cache"]
    argv = ["eval", "knn", "linear", "--epochs", "1", *small, "--baselines"]
    assert main([*argv, "--checkpoint", str(out)]) == 0
    results = tmp_path / "export" / "eval"
    knn = json.loads((results / "knn.json").read_text())
    assert [r["model"] for r in knn["rows"]] == ["raw pixels", "random init", "pretrained"]
    assert (knn["n_train"], knn["n_test"]) == (200, 50)
    assert (results / "linear.json").is_file()
    assert main(["eval", "knn", *small, "--checkpoint", str(run)]) == 0
    assert _top1(run / "eval" / "knn.json") == knn["rows"][-1]["top1"]


def test_eval_flags_keep_their_spelling_and_defaults():
    """Every `mimar eval` flag of earlier versions, now generated from the protocols' option
    dataclasses: (flag, dest, default)."""
    before = [
        ("--checkpoint", "checkpoint", None),
        ("--recipe", "recipe", None),
        ("--resume", "resume", False),
        ("--neck", "neck", "pretrained"),
        ("--layer", "layer", None),
        ("--pool", "pool", "avg"),
        ("--attention", "attention", "bidirectional"),
        ("--blocks", "blocks", None),
        ("--probe-bias", "classifier_bias", False),
        ("--lora-rank", "lora_rank", 8),
        ("--data", "data_root", None),
        ("--max-train", "max_train", 0),
        ("--max-test", "max_test", 0),
        ("--baselines", "baselines", False),
        ("--batch-size", "batch_size", 256),
        ("--no-feature-cache", "feature_cache", True),
        ("--k", "k", 20),
        ("--epochs", "epochs", None),
        ("--device", "device", "auto"),
    ]
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    actions = {s: a for a in sub.choices["eval"]._actions for s in a.option_strings}
    for flag, dest, default in before:
        assert actions[flag].dest == dest and actions[flag].default == default, flag
    assert actions["--checkpoint"].required
    parsed = build_parser().parse_args(
        ["eval", "knn", "--checkpoint", "r", "--layer", "all", "--blocks", "0,2"]
    )
    assert (parsed.layer, parsed.blocks) == ("all", (0, 2))


def test_a_bad_layer_is_one_argparse_line(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["eval", "knn", "--checkpoint", "r", "--layer", "last"])
    assert stop.value.code == 2
    assert "expected a block index or 'all', got 'last'" in capsys.readouterr().err


def test_python_dash_m_mimar_cli_runs_the_command_line():
    out = subprocess.run(
        [sys.executable, "-m", "mimar.cli", "eval", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0 and "--no-feature-cache" in out.stdout
