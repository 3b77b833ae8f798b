"""Faults and bad input end in one clear line and lose nothing: config ranges, resuming with a
changed config, torn metrics, signal exit codes, checkpoint integrity, a full disk, recipe size
and eval options."""

import errno
import json
import logging
import os
import shutil
import signal
import zipfile

import pytest
import torch
import yaml
from helpers import DEMO, TINY, losses

from mimar.cli import main
from mimar.config import MAX_RECIPE_BYTES, ConfigError, load_config
from mimar.engine import checkpoint
from mimar.engine.logger import MetricsLog
from mimar.errors import CheckpointError
from mimar.evaluation import EvalConfig
from mimar.methods.digpt import default_memory_layers

AIM = "configs/aim/vit_tiny_fmnist.yaml"
DIGPT = "configs/digpt/vit_tiny_fmnist.yaml"


def pretrain(run_dir, *extra, resume=False, force=False):
    argv = ["pretrain", DEMO, *TINY, *extra, "--run-dir", str(run_dir)]
    argv += ["--resume"] if resume else []
    return main(argv + (["--allow-config-change"] if force else []))


def error_line(capsys) -> str:
    """The one ``mimar <command>: error:`` line on stderr (and no traceback)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("mimar ")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A finished 4-step tiny run (checkpoint at step 4)."""
    run = tmp_path_factory.mktemp("reliability") / "base"
    assert pretrain(run, "train.steps=4") == 0
    return run


@pytest.fixture
def run(base_run, tmp_path):
    """A private copy of the 4-step run, free to resume or damage."""
    copy = tmp_path / "run"
    shutil.copytree(base_run, copy)
    return copy


# 1. Ranges at config load ----------------------------------------------------------------


@pytest.mark.parametrize(
    "recipe, override, key",
    [
        (DEMO, "optim.clip_grad=-1", "optim.clip_grad"),
        (DEMO, "optim.weight_decay=-0.1", "optim.weight_decay"),
        (DEMO, "optim.warmup_fraction=2", "optim.warmup_fraction"),
        (DEMO, "optim.warmup_fraction=-0.5", "optim.warmup_fraction"),
        (DEMO, "optim.lr=0", "optim.lr"),
        (DEMO, "optim.lr=nan", "optim.lr"),
        (DEMO, "optim.base_lr=-1e-4", "optim.base_lr"),
        (DEMO, "optim.min_lr_ratio=1.5", "optim.min_lr_ratio"),
        (DEMO, "optim.layer_decay=0", "optim.layer_decay"),
        (DEMO, "optim.warmup_steps=-3", "optim.warmup_steps"),
        (DEMO, "train.checkpoint_every=-1", "train.checkpoint_every"),
        (DEMO, "train.threads=-2", "train.threads"),
        (DEMO, "backbone.patch_size=0", "backbone.patch_size"),
        (DEMO, "backbone.depth=0", "backbone.depth"),
        (DEMO, "backbone.embed_dim=0", "backbone.embed_dim"),
        (DEMO, "backbone.num_heads=0", "backbone.num_heads"),
        (DEMO, "backbone.drop_path_rate=1.0", "backbone.drop_path_rate"),
        (DEMO, "method.mask_ratio=1.0", "method.mask_ratio"),
        (DEMO, "method.mask_patch_size=0", "method.mask_patch_size"),
        (AIM, "method.head_width=0", "method.head_width"),
        (AIM, "method.head_depth=-1", "method.head_depth"),
        (DIGPT, "method.memory_layers=[7]", "method.memory_layers"),
        (DIGPT, "method.memory_layers=[0,2]", "method.memory_layers"),
        ("configs/itpn/hivit_tiny_fmnist.yaml", "backbone.num_heads=0", "backbone.num_heads"),
        ("configs/itpn/hivit_tiny_fmnist.yaml", "method.decoder_dim=0", "method.decoder_dim"),
    ],
)
def test_an_out_of_range_value_is_a_config_error_naming_the_key(recipe, override, key):
    with pytest.raises(ConfigError) as err:
        load_config(recipe, [override])
    message = str(err.value)
    assert message.startswith(key) and " must " in message and "\n" not in message, message


@pytest.mark.parametrize(
    "override",
    [
        "optim.clip_grad=0",
        "optim.clip_grad=null",
        "optim.warmup_fraction=0",
        "optim.warmup_fraction=1",
        "optim.weight_decay=0",
        "train.checkpoint_every=0",
        "optim.lr=null",
    ],
)
def test_the_edges_of_each_range_are_accepted(override):
    load_config(DEMO, [override])


def test_a_negative_clip_grad_stops_the_cli_in_one_line(tmp_path, capsys):
    assert pretrain(tmp_path / "r", "optim.clip_grad=-1") == 2
    line = error_line(capsys)
    assert "optim.clip_grad must be >= 0" in line and "got -1.0" in line
    assert not (tmp_path / "r").exists()  # refused before anything is written


def test_digpt_default_memory_layers_exist_at_every_depth():
    assert default_memory_layers(1) == (1,)
    for depth in range(1, 30):
        layers = default_memory_layers(depth)
        assert layers and all(1 <= i <= depth for i in layers)
    load_config(DIGPT, ["backbone.depth=1", "method.memory_layers=[]"])


def test_an_override_that_is_not_yaml_is_a_config_error():
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(DEMO, ["optim.lr=[1,"])


# 2. Resume with a changed config -----------------------------------------------------------


def test_a_resume_with_a_changed_lr_is_refused_and_leaves_the_run_alone(run, capsys):
    config, last = (run / "config.yaml").read_bytes(), (run / "checkpoints/last.pt").read_bytes()
    old_lr = yaml.safe_load(config)["optim"]["lr"]
    assert pretrain(run, "train.steps=6", "optim.lr=1e-3", resume=True) == 2
    line = error_line(capsys)
    last_pt = run / "checkpoints/last.pt"
    assert f"differs from the one {last_pt} was trained with: optim.lr {old_lr} -> 0.001" in line
    assert line.endswith("pass --allow-config-change to force")
    assert (run / "config.yaml").read_bytes() == config
    assert (run / "checkpoints/last.pt").read_bytes() == last
    assert max(losses(run)) == 4


def test_a_resume_with_another_width_is_the_same_one_line_refusal(run, capsys):
    assert pretrain(run, "train.steps=6", "backbone.embed_dim=64", resume=True) == 2
    assert "backbone.embed_dim 32 -> 64" in error_line(capsys)


def test_a_resume_may_extend_steps_and_change_what_cannot_change_the_numbers(run):
    harmless = ["train.log_every=2", "train.checkpoint_every=3", "train.threads=2"]
    assert pretrain(run, "train.steps=6", *harmless, resume=True) == 0
    assert sorted(losses(run)) == [1, 2, 3, 4, 6]
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["steps"] == 6
    assert not (run / "config_changes.jsonl").exists()


def test_fewer_steps_on_resume_is_a_change(run, capsys):
    assert pretrain(run, "train.steps=3", resume=True) == 2
    assert "train.steps 4 -> 3" in error_line(capsys)


def test_allow_config_change_forces_the_resume_and_records_each_change(run):
    old_lr = yaml.safe_load((run / "config.yaml").read_text())["optim"]["lr"]
    extra = ["optim.lr=1e-3", "optim.weight_decay=0.01"]
    assert pretrain(run, "train.steps=6", *extra, resume=True, force=True) == 0
    rows = [json.loads(line) for line in (run / "config_changes.jsonl").read_text().splitlines()]
    assert rows == [
        {"step": 4, "key": "optim.lr", "old": old_lr, "new": 0.001},
        {"step": 4, "key": "optim.weight_decay", "old": 0.05, "new": 0.01},
    ]
    assert yaml.safe_load((run / "config.yaml").read_text())["optim"]["lr"] == 0.001
    assert sorted(losses(run)) == list(range(1, 7))


def test_a_forced_change_the_checkpoint_cannot_take_is_one_line(run, capsys):
    assert pretrain(run, "train.steps=6", "backbone.embed_dim=64", resume=True, force=True) == 2
    line = error_line(capsys)
    assert "does not fit the model of the config: size mismatch for backbone." in line


# 3. A torn metrics line --------------------------------------------------------------------


def test_metrics_log_drops_a_torn_last_line_with_a_warning(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.9}\n{"step": 3, "lo')
    with caplog.at_level(logging.WARNING, logger="mimar"):
        log = MetricsLog(path, resume_step=2)
    log.write({"step": 3, "loss": 0.8})
    log.close()
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]
    assert "line 3 is not a JSON row" in caplog.text


def test_a_run_with_a_torn_metrics_line_resumes(run):
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "epoch": 0.01, "lo')  # killed in the middle of a write
    assert pretrain(run, "train.steps=6", resume=True) == 0
    assert sorted(losses(run)) == list(range(1, 7))


# 4. Signals: a checkpoint, then 128 + signal -----------------------------------------------


def test_sigint_saves_a_checkpoint_and_exits_130(tmp_path, monkeypatch, capsys):
    write = MetricsLog.write

    def write_then_interrupt(self, row):
        write(self, row)
        if row["step"] == 2:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C: the real handler path

    monkeypatch.setattr(MetricsLog, "write", write_then_interrupt)
    run = tmp_path / "run"
    assert pretrain(run, "train.steps=10") == 130
    assert "stopped by SIGINT after step 2" in capsys.readouterr().err
    assert checkpoint.load(run / "checkpoints/last.pt")["step"] == 2


# 5. Checkpoint integrity -------------------------------------------------------------------


def _flip_tensor_bytes(path):
    """XOR 64 bytes in the middle of the biggest tensor record of a torch zip file."""
    with zipfile.ZipFile(path) as z:
        big = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
        offset = big.header_offset + 30 + len(big.filename.encode()) + len(big.extra)
    offset += big.file_size // 2
    with open(path, "r+b") as f:
        f.seek(offset)
        chunk = f.read(64)
        f.seek(offset)
        f.write(bytes(b ^ 0x5A for b in chunk))


def _state():
    return {
        "model": {"w": torch.randn(64, 64), "b": torch.zeros(3, dtype=torch.bfloat16)},
        "step": 7,
        "config": {"optim": {"lr": 1e-3, "betas": [0.9, 0.95]}},
        "extra": (1, None, "x"),
    }


def test_a_checkpoint_round_trips_with_its_content_hash(tmp_path):
    state = _state()
    checkpoint.save(state, tmp_path / "a.pt", tmp_path / "b.pt")
    raw = torch.load(tmp_path / "a.pt", weights_only=True)
    assert raw[checkpoint.HASH_KEY] == checkpoint.content_hash(state)
    for name in ("a.pt", "b.pt"):
        loaded = checkpoint.load(tmp_path / name)
        assert checkpoint.HASH_KEY not in loaded and loaded["step"] == 7
        torch.testing.assert_close(loaded["model"]["w"], state["model"]["w"])


def test_the_content_hash_sees_values_dtypes_and_shapes():
    state = _state()
    base = checkpoint.content_hash(state)
    assert checkpoint.content_hash(_state() | {"model": dict(state["model"])}) == base
    for change in (
        {"w": state["model"]["w"].clone().index_fill_(0, torch.tensor([5]), 0.0)},
        {"w": state["model"]["w"].reshape(32, 128)},
        {"b": state["model"]["b"].half()},
    ):
        assert checkpoint.content_hash(state | {"model": state["model"] | change}) != base
    assert checkpoint.content_hash(state | {"step": 8}) != base


def test_flipped_bytes_in_tensor_data_are_refused(tmp_path):
    path = tmp_path / "last.pt"
    checkpoint.save(_state(), path)
    _flip_tensor_bytes(path)
    torch.load(path, weights_only=True)  # torch itself does not notice
    with pytest.raises(CheckpointError, match=r"is corrupt \(content hash mismatch\)$"):
        checkpoint.load(path)


def test_a_corrupt_run_checkpoint_stops_resume_and_eval_in_one_line(run, capsys):
    _flip_tensor_bytes(run / "checkpoints/last.pt")
    assert pretrain(run, "train.steps=6", resume=True) == 2
    expected = f"checkpoint {run / 'checkpoints/last.pt'} is corrupt (content hash mismatch)"
    assert error_line(capsys).endswith(expected)
    assert main(["eval", "knn", "--checkpoint", str(run)]) == 2
    assert error_line(capsys).endswith(expected)


def test_a_foreign_pickle_is_refused_without_unsafe_advice(tmp_path):
    path = tmp_path / "foreign.pt"
    torch.save({"model": logging.Formatter("%(message)s")}, path)  # an arbitrary object
    with pytest.raises(CheckpointError) as err:
        checkpoint.load(path)
    message = str(err.value)
    assert "not a mimar checkpoint" in message and "unsafe pickle refused" in message
    assert "weights_only" not in message and "\n" not in message


def test_a_torch_file_without_our_keys_names_the_missing_ones(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"model": {"w": torch.ones(2)}}, path)
    with pytest.raises(CheckpointError, match="not a mimar checkpoint: missing keys step, config"):
        checkpoint.load(path)
    torch.save([torch.ones(2)], path)
    with pytest.raises(CheckpointError, match="holds a list"):
        checkpoint.load(path)


def test_a_truncated_checkpoint_is_one_line(tmp_path):
    path = tmp_path / "last.pt"
    checkpoint.save(_state(), path)
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(CheckpointError, match="cannot read checkpoint") as err:
        checkpoint.load(path)
    assert "\n" not in str(err.value)


def test_a_checkpoint_from_before_the_hash_loads_with_a_warning(tmp_path, caplog):
    path = tmp_path / "old.pt"
    checkpoint.save_atomic(_state(), path)  # as mimar wrote checkpoints before the hash
    with caplog.at_level(logging.WARNING, logger="mimar"):
        assert checkpoint.load(path)["step"] == 7
    assert "has no content hash" in caplog.text


# 6. A full disk while checkpointing; leftover temp files -----------------------------------


def test_a_full_disk_while_checkpointing_keeps_the_previous_checkpoint(run, monkeypatch, capsys):
    before = (run / "checkpoints/last.pt").read_bytes()

    def full_disk(state, f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    assert pretrain(run, "train.steps=6", resume=True) == 74  # EX_IOERR: mimar.writes
    path = run / "checkpoints/last.pt"
    assert error_line(capsys).endswith(
        f"cannot write checkpoint {path}: no space left on the device; free space or write "
        "elsewhere; the previous checkpoint is intact"
    )
    assert path.read_bytes() == before and checkpoint.load(path)["step"] == 4
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.pt"]
    assert max(losses(run)) == 5  # the metrics up to the failed save (step 5) are kept


def test_leftover_temp_files_are_removed_when_a_run_starts_or_resumes(run, tmp_path):
    orphan = run / "checkpoints" / ".last.pt.abc123.tmp"
    orphan.write_bytes(b"half a checkpoint")
    assert pretrain(run, "train.steps=5", resume=True) == 0
    assert not orphan.exists()
    fresh = tmp_path / "fresh"
    (fresh / "checkpoints").mkdir(parents=True)
    (fresh / "checkpoints" / ".last.pt.xyz.tmp").write_bytes(b"x")
    assert pretrain(fresh, "train.steps=1") == 0
    assert sorted(p.name for p in (fresh / "checkpoints").iterdir()) == ["last.pt"]


# 7. Recipe size ----------------------------------------------------------------------------


def test_a_recipe_over_the_size_cap_is_refused_before_parsing(tmp_path, monkeypatch):
    big = tmp_path / "big.yaml"
    big.write_text("# padding\n" * (MAX_RECIPE_BYTES // 10 + 1))

    def no_parse(*args, **kwargs):
        raise AssertionError("the recipe was parsed")

    monkeypatch.setattr(yaml, "safe_load", no_parse)
    with pytest.raises(ConfigError, match=r"big.yaml is 1.0 MB: a recipe is at most 1 MB"):
        load_config(big)


# 8. Eval options ---------------------------------------------------------------------------


def test_eval_config_refuses_more_neighbours_than_train_images():
    with pytest.raises(ConfigError, match="k=50 neighbours but max_train=20"):
        EvalConfig(protocols=["knn"], checkpoint="r", k=50, max_train=20)
    EvalConfig(protocols=["linear"], checkpoint="r", k=50, max_train=20)  # no kNN: no limit
    with pytest.raises(ConfigError, match="batch_size must be a positive integer"):
        EvalConfig(protocols=["knn"], checkpoint="r", batch_size=0)


@pytest.mark.parametrize(
    "options, message",
    [
        (["--k", "500"], "--k 500: more neighbours than the 128 train images"),
        (["--layer", "2"], "--layer 2: the backbone has blocks 0..1"),
        (["--layer", "-3"], "--layer -3: the backbone has blocks 0..1 (negative counts"),
        (["--batch-size", "0"], "batch_size must be a positive integer, got 0"),
    ],
)
def test_eval_refuses_bad_options_in_one_line(base_run, options, message, capsys):
    assert main(["eval", "knn", "--checkpoint", str(base_run), *options]) == 2
    assert message in error_line(capsys)


def test_eval_takes_a_negative_layer_as_counted_from_the_end(base_run):
    assert main(["eval", "knn", "--checkpoint", str(base_run), "--layer", "-1"]) == 0
    row = json.loads((base_run / "eval" / "knn.json").read_text())["rows"][0]
    assert row["layer"] == "block -1"
