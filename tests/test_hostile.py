"""Issue 27, a hostile world: one test per failure class, each one that the original failure
would have failed (labels, run lock, hostile recipes, closed pipes, failing writes, resume,
sizes, partial artifacts)."""

import errno
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import default_signals
from PIL import Image

from mimar.config import load_config
from mimar.data import DataConfig, load_images
from mimar.errors import ConfigError, DataError, RunLockedError

DEMO = "configs/simmim/vit_tiny_fmnist.yaml"


# --- class 1: labels -------------------------------------------------------------------------
def _folder(root: Path, classes: dict[str, list[str]]) -> Path:
    """``root/<split>/<class>/*.png``: 3 images per class, the class's grey level its index
    in the sorted non-empty list (so a shifted label is visible)."""
    for split, names in classes.items():
        for k, name in enumerate(names):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(3):
                Image.fromarray(np.full((8, 8), 40 * k + i, np.uint8)).save(folder / f"{i}.png")
    return root


def _cfg(root: Path) -> DataConfig:
    return DataConfig(name="image_folder", root=str(root), img_size=8, in_chans=1)


def test_an_empty_class_folder_shifts_no_label(tmp_path):
    ref = _folder(tmp_path / "ref", {"train": ["a", "b"], "val": ["a", "b"]})
    hostile = _folder(tmp_path / "hostile", {"train": ["a", "b"], "val": ["a", "b"]})
    (hostile / "train" / "000_empty").mkdir()  # sorts first, holds nothing
    (hostile / "val" / "000_empty").mkdir()
    for split in ("train", "test"):
        a, b = load_images(_cfg(ref), split), load_images(_cfg(hostile), split)
        assert a.classes == b.classes == ["a", "b"]
        assert a.labels.tolist() == b.labels.tolist()


def test_held_out_split_uses_the_train_mapping(tmp_path):
    root = _folder(tmp_path / "d", {"train": ["a", "b", "c"], "val": ["b", "c"]})
    test = load_images(_cfg(root), "test")
    assert test.classes == ["a", "b", "c"] and sorted(set(test.labels.tolist())) == [1, 2]


def test_a_test_class_unknown_to_training_is_named(tmp_path):
    root = _folder(tmp_path / "d", {"train": ["a", "b"], "val": ["a", "zebra"]})
    with pytest.raises(DataError, match="zebra"):
        load_images(_cfg(root), "test")


def _patterns(root: Path, split_classes: dict[str, dict[str, int]]) -> Path:
    """``root/<split>/<class>/<i>.png``, image i of every class its own random 16 px pattern
    (the same pattern in every split, so a test image is a copy of a train image)."""
    for split, counts in split_classes.items():
        for name, n in counts.items():
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                rng = np.random.default_rng([sum(map(ord, name)), i])
                pixels = rng.integers(0, 256, (16, 16)).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")
    return root


@pytest.mark.parametrize("k", [2, 5])
def test_unknown_test_classes_can_be_scored_wrong(tmp_path, k):
    """--unknown-classes wrong: the k images of a test-only class count as wrong in every
    protocol's top-1 over all test images, and the JSON and notes say how many of which."""
    import json

    from mimar.cli import main

    run = tmp_path / "run"
    assert main(["pretrain", DEMO, *TINY_RUN, "train.steps=1", "--run-dir", str(run)]) == 0
    known = {"a": 3, "b": 3}
    data = _patterns(tmp_path / "d", {"train": known, "val": known | {"zebra": k}})
    args = ["eval", "knn", "linear", "--checkpoint", str(run), "--data", f"image_folder:{data}"]
    args += ["--baselines", "--k", "1", "--epochs", "2", "--no-feature-cache"]
    assert main(args) == 2  # the default: an error naming the class (checked in the next test)
    assert main([*args, "--unknown-classes", "wrong"]) == 0
    by_hand = 100.0 * 6 / (6 + k)  # each known test image is a copy of its nearest neighbour
    for protocol in ("knn", "linear"):
        saved = json.loads((run / "eval" / f"{protocol}.json").read_text())
        assert saved["n_test"] == 6 + k and saved["unknown_classes"] == {"zebra": k}
        assert saved["classes"] == ["a", "b"]
        note = f"{k} test images of 1 class unknown to training scored wrong (zebra {k})"
        for row in saved["rows"]:
            assert note in row["notes"]
            assert row["top1"] <= by_hand + 1e-4  # never a point for an unknown class
        if protocol == "knn":
            pixels = next(r for r in saved["rows"] if r["model"] == "raw pixels")
            assert pixels["top1"] == pytest.approx(by_hand)


def test_unknown_test_classes_count_as_wrong_in_the_finetune_and_robustness(tmp_path):
    import json

    from mimar.cli import main

    run = tmp_path / "run"
    assert main(["pretrain", DEMO, *TINY_RUN, "train.steps=1", "--run-dir", str(run)]) == 0
    known = {"a": 4, "b": 4}
    data = _patterns(tmp_path / "d", {"train": known, "val": {"a": 2, "b": 2, "zebra": 3}})
    ft = ["--recipe", "configs/finetune/fmnist.yaml", "finetune.schedule.epochs=1",
          "finetune.batch_size=4", "finetune.progress=false", "finetune.precision=fp32",
          "finetune.threads=1"]  # fmt: skip
    where = ["--checkpoint", str(run), "--data", f"image_folder:{data}"]
    assert main(["eval", "finetune", *where, *ft]) == 2  # the default: refused, naming zebra
    assert main(["eval", "finetune", *where, *ft, "--unknown-classes", "wrong"]) == 0
    bound = 100.0 * 4 / 7  # at most the 4 known of 7 test images
    row = json.loads((run / "eval" / "finetune.json").read_text())["rows"][0]
    assert row["details"]["unknown_classes"] == {"zebra": 3} and row["details"]["n_test"] == 7
    assert row["top1"] <= bound + 1e-4 and "3 test images of 1 class unknown" in row["notes"]
    robust = ["eval", "robustness", *where]
    assert main(robust) == 2
    assert main([*robust, "--unknown-classes", "wrong"]) == 0
    saved = json.loads((run / "eval" / "robustness.json").read_text())
    assert saved["n_test"] == 7 and saved["rows"][0]["details"]["clean_top1"] <= bound + 1e-4


def test_unknown_classes_map_by_name_onto_the_train_indices():
    import torch

    from mimar.data.image_set import UNKNOWN_LABEL, ImageSet, align_classes

    def images(labels, classes):
        n = len(labels)
        pixels = torch.zeros(n, 1, 2, 2, dtype=torch.uint8)
        return ImageSet(pixels, torch.tensor(labels), classes, (0.5,), (0.5,))

    train = images([0, 1, 2], ["a", "b", "c"])
    test = images([0, 1, 2, 3, 3], ["c", "zebra", "a", "yak"])  # another order, two unknown
    with pytest.raises(DataError, match="zebra"):
        align_classes(train, test, "d")
    aligned, unknown = align_classes(train, test, "d", "wrong")
    assert aligned.labels.tolist() == [2, UNKNOWN_LABEL, 0, UNKNOWN_LABEL, UNKNOWN_LABEL]
    assert aligned.classes == ["a", "b", "c"] and unknown == {"zebra": 1, "yak": 2}
    same, none = align_classes(train, images([1, 0], ["a", "b", "c"]), "d", "wrong")
    assert same.labels.tolist() == [1, 0] and none == {}


# --- class 7: hostile recipes ----------------------------------------------------------------
def _bomb(path: Path, base: str) -> Path:
    lines = ["x0: &x0 [0.25, 0.25, 0.25, 0.25, 0.25, 0.25, 0.25, 0.25, 0.25, 0.25]"]
    for i in range(1, 10):
        lines.append(f"x{i}: &x{i} [" + ", ".join([f"*x{i - 1}"] * 10) + "]")
    lines += [f"base: {base}", "data: {mean: *x9}"]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize(
    "text, message",
    [
        (None, "aliases expand"),  # the 10^9-value bomb
        ("a: " + "[" * 5000 + "]" * 5000 + "\n", "nesting deeper"),
        ("a0: &a0 [1]\n" + "".join(f"a{i}: &a{i} [*a{i - 1}]\n" for i in range(1, 500)), "nesting"),
        ("a: &a [1, *a]\n", "contains itself"),
        ("optim:\n  lr: 1.0\ntrain:\n  steps: 3\noptim:\n  weight_decay: 0.1\n", "lines 1 and 5"),
        ("train:\n  steps: 3\n  steps: 4\n", "lines 2 and 3"),
    ],
)
def test_hostile_recipes_are_refused_fast(tmp_path, text, message):
    path = tmp_path / "r.yaml"
    if text is None:
        _bomb(path, str(Path(DEMO).resolve()))
    else:
        path.write_text(text)
    with pytest.raises(ConfigError, match=message) as err:  # (its speed: acceptance O1, not here)
        load_config(path)
    assert len(str(err.value)) < 600


def test_an_error_quotes_at_most_200_characters_of_a_value(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(f"base: {Path(DEMO).resolve()}\ndata:\n  mean: [{', '.join(['x'] * 50000)}]\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert len(str(err.value)) < 600


def test_anchors_within_bounds_still_work(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(
        f"base: {Path(DEMO).resolve()}\nstats: &s [0.5]\ndata:\n  mean: *s\n  std: *s\n".replace(
            "stats", "x"
        )
    )
    with pytest.raises(ConfigError, match="unknown config key 'x'"):  # anchors parse
        load_config(path)
    path.write_text(f"base: {Path(DEMO).resolve()}\ndata:\n  mean: &s [0.5]\n  std: *s\n")
    assert load_config(path).data.std == (0.5,)


def test_a_merge_key_may_be_overridden(tmp_path):
    from mimar import recipe_yaml

    assert recipe_yaml.load("a: &a {x: 1, y: 2}\nb:\n  <<: *a\n  x: 3\n")["b"] == {"x": 3, "y": 2}


# --- class 2: one process per run folder -----------------------------------------------------
TINY_RUN = [
    "data.name=synthetic",
    "data.synthetic_size=64",
    "data.batch_size=16",
    "data.img_size=16",
    "backbone.img_size=16",
    "backbone.embed_dim=32",
    "backbone.depth=2",
    "backbone.num_heads=2",
    "method.mask_patch_size=8",
    "train.precision=fp32",
    "train.progress=false",
    "train.threads=1",
]
ROOT = Path(__file__).resolve().parents[1]


def _cli(*argv: str, **popen) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "mimar.cli", *argv]
    return subprocess.Popen(command, cwd=ROOT, env=env, text=True, **popen)


def _wait_for(check, seconds: float = 60) -> None:
    end = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.2)


@pytest.mark.parametrize("second", [[], ["--resume", "auto"]])
def test_a_second_process_on_a_live_run_folder_is_refused_naming_the_pid(tmp_path, second):
    run = tmp_path / "run"
    first = _cli(
        "pretrain", DEMO, *TINY_RUN, "train.steps=100000", "train.checkpoint_every=2",
        "--run-dir", str(run), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        _wait_for(lambda: (run / "checkpoints" / "last.pt").is_file())
        out = _cli(
            "pretrain", DEMO, *TINY_RUN, "--run-dir", str(run), *second,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        ).communicate(timeout=120)  # fmt: skip
        lines = out[1].strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in out[1], out[1]
        assert f"process {first.pid} is training into it" in lines[0]
    finally:
        first.terminate()
        first.wait(timeout=60)


def test_the_lock_dies_with_its_process(tmp_path):
    """flock: a killed holder leaves no stale lock; in one process the lock is reentrant."""
    from mimar import runs

    run = tmp_path / "run"
    code = "import sys, time; from mimar import runs; runs.lock_run(sys.argv[1]); print(1); " \
        "sys.stdout.flush(); time.sleep(60)"  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(run)], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout.readline().strip() == "1"
    with pytest.raises(RunLockedError, match=f"process {holder.pid} "):
        runs.lock_run(run)
    holder.kill()  # as kill -9: no cleanup code runs
    holder.wait()
    assert runs.lock_run(run) and not runs.lock_run(run)  # taken, then reentrant
    runs.unlock_run(run)


# --- class 6: closed pipes -------------------------------------------------------------------
@pytest.mark.parametrize("progress", ["true", "false"])
def test_a_closed_output_pipe_does_not_stop_training(tmp_path, progress):
    run = tmp_path / "run"
    proc = _cli(
        "pretrain", DEMO, *TINY_RUN, "train.steps=20", "train.log_every=1",
        f"train.progress={progress}", "--run-dir", str(run),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    proc.stdout.readline()  # as `2>&1 | head -n 1`: one line, then the reader is gone
    proc.stdout.close()
    assert proc.wait(timeout=120) == 0
    rows = [line for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert len(rows) == 20 and (run / "checkpoints" / "last.pt").is_file()


def test_quiet_stream_swallows_a_broken_pipe_only():
    from mimar.streams import QuietStream

    class Gone:
        def write(self, text):
            raise BrokenPipeError(errno.EPIPE, "Broken pipe")

        def fileno(self):
            raise ValueError("no descriptor")

    class Full(Gone):
        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

    stream = QuietStream(Gone())
    assert stream.write("x") == 1 and stream.closed_early and stream.write("y") == 1
    with pytest.raises(OSError):  # a full disk behind stdout is not a closed reader
        QuietStream(Full()).write("x")


# --- class 3: the checkpoint's config is the reference of a resume ---------------------------
@pytest.mark.parametrize("edit", ["match", "delete"])
def test_an_edited_or_deleted_config_copy_lets_no_change_through(tmp_path, edit, capsys, caplog):
    import yaml

    from mimar.cli import main

    run = tmp_path / "run"
    assert main(["pretrain", DEMO, *TINY_RUN, "train.steps=2", "--run-dir", str(run)]) == 0
    copy = run / "config.yaml"
    if edit == "match":  # the copy edited to agree with the change the resume makes
        cfg = yaml.safe_load(copy.read_text())
        cfg["optim"]["lr"] = 0.5
        copy.write_text(yaml.safe_dump(cfg))
    else:
        copy.unlink()
    capsys.readouterr()
    argv = ["pretrain", DEMO, *TINY_RUN, "train.steps=3", "--run-dir", str(run), "--resume"]
    assert main([*argv, "optim.lr=0.5"]) == 2
    assert "optim.lr" in capsys.readouterr().err
    caplog.clear()
    assert main(argv) == 0  # unchanged: resumes, and says what is wrong with the copy
    assert ("differs from the checkpoint" if edit == "match" else "is missing") in caplog.text


# --- class 9: SIGINT, SIGTERM, SIGHUP alike --------------------------------------------------
def test_sighup_checkpoints_a_run_like_sigterm(tmp_path, monkeypatch, capsys):
    import signal

    from mimar.cli import main
    from mimar.engine import checkpoint
    from mimar.engine.logger import MetricsLog

    write = MetricsLog.write

    def write_then_hang_up(self, row):
        write(self, row)
        if row["step"] == 2:
            os.kill(os.getpid(), signal.SIGHUP)  # the terminal went away

    monkeypatch.setattr(MetricsLog, "write", write_then_hang_up)
    run = tmp_path / "run"
    argv = ["pretrain", DEMO, *TINY_RUN, "train.steps=10", "--run-dir", str(run)]
    before = signal.signal(signal.SIGHUP, signal.SIG_DFL)  # as a terminal's child (not nohup)
    try:
        assert main(argv) == 129
    finally:
        signal.signal(signal.SIGHUP, before)
    assert "stopped by SIGHUP after step 2" in capsys.readouterr().err
    assert checkpoint.load(run / "checkpoints/last.pt")["step"] == 2


@pytest.mark.parametrize("name, code", [("SIGINT", 130), ("SIGTERM", 143), ("SIGHUP", 129)])
def test_a_signal_outside_training_is_one_line_and_128_plus_n(name, code):
    """Any command without training state (here: a stand-in for kNN's extraction loop)."""
    script = (
        "import os, signal, sys\n"
        "from mimar import cli\n"
        "from mimar.cli import export as export_group\n"
        "def busy(args):\n"
        f"    os.kill(os.getpid(), signal.{name})\n"
        "    while True: pass\n"
        "export_group.export = busy\n"
        "sys.exit(cli.main(['export', '--checkpoint', 'x', '--out', 'y.safetensors']))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=120, preexec_fn=default_signals,
    )  # fmt: skip
    assert out.returncode == code and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.strip() == f"mimar export: stopped by {name}"


# --- class 10: partial artifacts -------------------------------------------------------------
def test_an_interrupted_shard_run_is_refused_by_training_and_resumed(tmp_path, monkeypatch):
    pytest.importorskip("webdataset")
    from mimar.data import shard_writer
    from mimar.data.shards import open_shards

    images = _folder(tmp_path / "img", {"train": ["a", "b", "c"]}) / "train"
    pattern = str(tmp_path / "out" / "train-%06d.tar")
    write = shard_writer._write_shard

    def killed_at_the_third(wds, target, samples, advance):
        if target.name == "train-000002.tar":
            raise KeyboardInterrupt  # as SIGINT / SIGTERM in the CLI
        return write(wds, target, samples, advance)

    monkeypatch.setattr(shard_writer, "_write_shard", killed_at_the_third)
    with pytest.raises(KeyboardInterrupt):
        shard_writer.write_shards(images, pattern, shard_size=2, progress=False)
    monkeypatch.undo()
    root = str(tmp_path / "out" / "train-{000000..000001}.tar")
    with pytest.raises(DataError, match="interrupted.*--resume"):
        open_shards(root, (0.5,), (0.5,))  # two of five shards: not a smaller data set
    with pytest.raises(ConfigError, match="--resume"):
        shard_writer.write_shards(images, pattern, shard_size=2, progress=False)
    summary = shard_writer.write_shards(images, pattern, shard_size=2, progress=False, resume=True)
    assert summary["shards"] == 5 and summary["images"] == 9
    assert len(open_shards(summary["root"].replace("'", ""), (0.5,), (0.5,))) == 9
    (tmp_path / "out" / "train-000004.tar").unlink()  # the index now disagrees
    with pytest.raises(DataError, match="train-000004.tar is missing"):
        open_shards(str(tmp_path / "out" / "train-{000000..000003}.tar"), (0.5,), (0.5,))


@pytest.mark.parametrize("damage", ["truncated json", "no mimar_backbone", "corrupt weights"])
def test_a_damaged_export_is_one_checkpoint_error(tmp_path, damage):
    import json

    import mimar
    from mimar.cli import main
    from mimar.errors import CheckpointError

    run, out = tmp_path / "run", tmp_path / "x.safetensors"
    assert main(["pretrain", DEMO, *TINY_RUN, "train.steps=1", "--run-dir", str(run)]) == 0
    assert main(["export", "--checkpoint", str(run), "--out", str(out)]) == 0
    meta = out.with_suffix(".json")
    if damage == "truncated json":
        meta.write_text(meta.read_text()[:40])
    elif damage == "no mimar_backbone":
        meta.write_text(json.dumps({k: v for k, v in json.loads(meta.read_text()).items()
                                    if k != "mimar_backbone"}))  # fmt: skip
    else:
        out.write_bytes(out.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="again"):
        mimar.load_backbone(out)


# --- class 8: absurd sizes -------------------------------------------------------------------
@pytest.mark.parametrize(
    "override",
    ["backbone.embed_dim=1048576", "backbone.depth=100000", "data.img_size=100000"],
)
def test_an_absurd_size_is_refused_before_allocating(tmp_path, capsys, override):
    from mimar.cli import main

    extra = [override, "backbone.img_size=100000"] if "img_size" in override else [override]
    assert main(["pretrain", DEMO, *extra, "--run-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "cannot fit: at least" in err and len(err.strip().splitlines()) == 1


def test_an_image_folder_too_big_to_decode_is_refused_first(tmp_path, monkeypatch):
    from mimar import machine

    root = _folder(tmp_path / "d", {"train": ["a", "b"]})
    monkeypatch.setattr(machine, "cpu_memory", lambda: 100)  # bytes: 6 images of 8 x 8 do not fit
    with pytest.raises(DataError, match="mimar data shard.*data.name=webdataset"):
        load_images(_cfg(root), "train")


def test_a_batch_larger_than_the_data_is_one_line(tmp_path, capsys):
    from mimar.cli import main

    argv = ["pretrain", DEMO, *TINY_RUN, "data.batch_size=128", "--run-dir", str(tmp_path / "r")]
    assert main(argv) == 2
    assert "fewer than data.batch_size=128" in capsys.readouterr().err
