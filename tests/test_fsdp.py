"""train.strategy=fsdp: FSDP2 over 2 gloo processes equals one process; DCP checkpoints reshard
(2 -> 1 and 2 -> 2 ranks), are read by eval and export, and refuse corrupt files; the exact
multi-process loss of methods whose ranks average different numbers of terms (AIM, EVA).

Tolerance: fp32 everywhere. The two sides see the same global batch, crops, masks and drop-path
draws; FSDP reduce-scatters gradients (and DDP all-reduces them) in another summation order, so
losses agree to float32 rounding, ~1e-7 relative per step, which Adam's per-element
normalisation can grow over a few steps: rel 1e-5 (measured: max 2.4e-7 over 4 AIM steps)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import ITPN_TINY, TINY, losses

from mimar.cli import main
from mimar.engine import checkpoint, fsdp
from mimar.errors import CheckpointError
from mimar.runs import newest_checkpoint

ROOT = Path(__file__).resolve().parents[1]
AIM = "configs/aim/vit_tiny_fmnist.yaml"
AIM_TINY = [
    *(w for w in TINY if not w.startswith("method.")),
    "backbone.patch_size=4",
    "method.head_width=32",
    "method.head_depth=1",
]
ITPN = "configs/itpn/hivit_tiny_fmnist.yaml"
EVA = "configs/eva/vit_tiny_fmnist.yaml"
REL, ABS = 1e-5, 1e-6


def one(recipe, words, run_dir, *extra, resume=False):
    argv = ["pretrain", recipe, *words, *extra, "--run-dir", str(run_dir)]
    assert main(argv + (["--resume"] if resume else [])) == 0


def two(recipe, words, run_dir, *extra, resume=False):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           "2", "-m", "mimar.cli", "pretrain", recipe, *words, *extra, "--run-dir", str(run_dir),
           *(["--resume"] if resume else [])]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]


def assert_same_losses(a: Path, b: Path, steps) -> None:
    la, lb = losses(a), losses(b)
    for step in steps:
        assert lb[step] == pytest.approx(la[step], rel=REL, abs=ABS), step


@pytest.mark.dist
def test_fsdp_equals_one_process_and_reshards_to_one_and_two_ranks(tmp_path):
    ref, run = tmp_path / "ref", tmp_path / "fsdp"
    words = [*AIM_TINY, "train.checkpoint_every=2"]
    one(AIM, words, ref, "train.steps=4")
    one(AIM, words, ref, "train.steps=6", resume=True)  # both sides extend the run to 6 steps
    two(AIM, words, run, "train.steps=4", "train.strategy=fsdp")
    assert sorted(losses(run)) == [1, 2, 3, 4]
    assert_same_losses(ref, run, [1, 2, 3, 4])
    ckpts = run / "checkpoints"
    assert fsdp.is_sharded_checkpoint(ckpts / "last.dcp")
    assert {p.name for p in (ckpts / "last.dcp").iterdir()} >= {"__0_0.distcp", "__1_0.distcp"}
    # the periodic save at step 2 was asynchronous: it holds step 2's weights, not later ones
    early = checkpoint.load(ckpts / "step_0000002.dcp")
    ref_early = checkpoint.load(ref / "checkpoints" / "step_0000002.pt")
    assert early["step"] == 2 and set(early["model"]) == set(ref_early["model"])
    for name, value in ref_early["model"].items():
        torch.testing.assert_close(early["model"][name], value, rtol=1e-5, atol=1e-6)
    again = tmp_path / "fsdp-on-two"
    shutil.copytree(run, again)
    one(AIM, words, run, "train.steps=6", "train.strategy=fsdp", resume=True)  # 2 -> 1 rank
    two(AIM, words, again, "train.steps=6", "train.strategy=fsdp", resume=True)  # 2 -> 2
    for resumed in (run, again):
        assert sorted(losses(resumed)) == [1, 2, 3, 4, 5, 6]
        assert_same_losses(ref, resumed, [5, 6])
    # eval and export read the DCP folder directly
    assert main(["eval", "knn", "--checkpoint", str(run), "--max-train", "64",
                 "--max-test", "32"]) == 0  # fmt: skip
    assert (run / "eval" / "knn.json").is_file()
    out = tmp_path / "aim.safetensors"
    assert main(["export", "--checkpoint", str(run), "--out", str(out)]) == 0
    from safetensors.torch import load_file

    exported = load_file(out)
    trained = checkpoint.load(newest_checkpoint(run))["model"]
    assert torch.equal(exported["pos_embed"], trained["backbone.pos_embed"])


@pytest.mark.dist
def test_fsdp_shards_ema_copies_and_frozen_teachers_alike(tmp_path):
    """iTPN's EMA (MFM) teacher is updated shard by shard; EVA's frozen teacher is sharded,
    outside the optimizer."""
    ref, run = tmp_path / "itpn-ref", tmp_path / "itpn-fsdp"
    one(ITPN, ITPN_TINY, ref, "train.steps=3")
    two(ITPN, ITPN_TINY, run, "train.steps=3", "train.strategy=fsdp")
    assert_same_losses(ref, run, [1, 2, 3])
    ema_ref = checkpoint.load(newest_checkpoint(ref))["model"]
    ema_run = checkpoint.load(newest_checkpoint(run))["model"]
    for name in (n for n in ema_ref if n.startswith("ema.")):
        torch.testing.assert_close(ema_run[name], ema_ref[name], rtol=1e-5, atol=1e-6)
    teacher = tmp_path / "teacher"
    one("configs/simmim/vit_tiny_fmnist.yaml", TINY, teacher, "train.steps=1")
    eva_words = [*AIM_TINY[:-2], f"teacher.path={teacher}", "method.min_num_patches=2"]
    eva_ref, eva_run = tmp_path / "eva-ref", tmp_path / "eva-fsdp"
    one(EVA, eva_words, eva_ref, "train.steps=3")
    two(EVA, eva_words, eva_run, "train.steps=3", "train.strategy=fsdp")
    assert_same_losses(eva_ref, eva_run, [1, 2, 3])


@pytest.mark.dist
def test_ddp_aim_loss_is_the_global_batch_mean(tmp_path):
    """AIM's ranks hold different numbers of non-prefix targets; the loss is weighted so that
    2-process DDP equals one process (it differed by 6e-3 before)."""
    ref, run = tmp_path / "ref", tmp_path / "ddp"
    one(AIM, AIM_TINY, ref, "train.steps=3")
    two(AIM, AIM_TINY, run, "train.steps=3")
    assert_same_losses(ref, run, [1, 2, 3])


@pytest.mark.dist
@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None, reason="no C++ compiler")
def test_fsdp_trains_a_compiled_model(tmp_path):
    """train.compile under fsdp: blocks are sharded, then the model is compiled. Inductor's
    fused kernels round differently from eager ones: rel 1e-4 against an eager one-process run
    (measured: 2e-5 after 6 steps of the demo ViT)."""
    ref, run = tmp_path / "ref", tmp_path / "compiled"
    one("configs/simmim/vit_tiny_fmnist.yaml", TINY, ref, "train.steps=3")
    two("configs/simmim/vit_tiny_fmnist.yaml", TINY, run, "train.steps=3",
        "train.strategy=fsdp", "train.compile=true")  # fmt: skip
    la, lb = losses(ref), losses(run)
    assert sorted(lb) == [1, 2, 3]
    for step in (1, 2, 3):
        assert lb[step] == pytest.approx(la[step], rel=1e-4), step


def test_units_are_the_outermost_module_list_entries():
    from torch import nn

    inner = nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 2)])
    block = nn.Sequential(nn.Linear(2, 2), nn.Module())
    block.add_module("nested", inner)
    model = nn.Module()
    model.blocks = nn.ModuleList([block, nn.Identity(), nn.Linear(2, 3)])
    model.head = nn.Linear(2, 2)
    assert fsdp.shard_units(model) == [block, model.blocks[2]]  # no parameterless, no nested


@pytest.fixture(scope="module")
def dcp_run(tmp_path_factory):
    """A one-process fsdp run: not sharded (one rank), but its checkpoint is a DCP folder."""
    run = tmp_path_factory.mktemp("dcp") / "run"
    one("configs/simmim/vit_tiny_fmnist.yaml", TINY, run, "train.steps=2", "train.strategy=fsdp")
    return run


def test_dcp_checkpoint_is_verified_and_resumes(dcp_run, tmp_path):
    last = dcp_run / "checkpoints" / "last.dcp"
    assert not (dcp_run / "checkpoints" / "last.pt").exists()
    state = checkpoint.load(newest_checkpoint(dcp_run))
    assert state["step"] == 2 and "backbone.pos_embed" in state["model"]
    bad = tmp_path / "bad.dcp"
    shutil.copytree(last, bad)
    shard = next(bad.glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt") as err:
        checkpoint.load(bad)
    assert "\n" not in str(err.value)
    (bad / fsdp.META).unlink()
    with pytest.raises(CheckpointError, match="not a mimar checkpoint"):
        checkpoint.load(bad)


@pytest.mark.parametrize("site", ["dcp.save", "mimar.pt"])
def test_a_failed_dcp_save_is_the_write_layers_one_line(tmp_path, monkeypatch, capsys, site):
    """Issue 27 class 5: DCP's own write (its gathered error names the errno) and the
    mimar.pt beside it end in one `cannot write` line, exit 74, the previous one intact."""
    import errno

    import torch.distributed.checkpoint as dcp

    from mimar import writes

    calls = {"n": 0}
    if site == "dcp.save":
        save = dcp.save

        def full(state, **kwargs):
            calls["n"] += 1
            if calls["n"] > 1:  # as DCP reports a rank's OSError(ENOSPC)
                raise RuntimeError("CheckpointException ranks:{0: OSError(28, 'No space left')}")
            return save(state, **kwargs)

        monkeypatch.setattr(dcp, "save", full)
    else:
        torch_save = writes.torch_save

        def read_only(obj, path, what=""):
            if Path(path).name == fsdp.META:
                calls["n"] += 1
                if calls["n"] > 1:
                    raise writes.explain(OSError(errno.EROFS, "Read-only file system"), path)
            return torch_save(obj, path, what)

        monkeypatch.setattr(writes, "torch_save", read_only)
    run = tmp_path / "run"
    argv = ["pretrain", "configs/simmim/vit_tiny_fmnist.yaml", *TINY, "train.steps=4"]
    argv += ["train.checkpoint_every=2", "train.strategy=fsdp", "--run-dir", str(run)]
    capsys.readouterr()
    assert main(argv) == 74
    stderr = capsys.readouterr().err
    err = [line for line in stderr.splitlines() if "error:" in line]
    assert len(err) == 1 and "cannot write checkpoint" in err[0], stderr
    assert "previous checkpoint is intact" in err[0] and "Traceback" not in stderr
    assert checkpoint.load(run / "checkpoints" / "last.dcp")["step"] == 2


def test_the_bench_sees_a_dcp_checkpoint(dcp_run, tmp_path):
    from mimar.bench.quality import run_state

    assert run_state(dcp_run, 2) == "finished" and run_state(dcp_run, 3) == "unfinished"
    assert run_state(tmp_path, 2) == "missing"


def test_resume_auto_starts_then_continues(tmp_path, capsys):
    run = tmp_path / "run"
    words = ["pretrain", "configs/simmim/vit_tiny_fmnist.yaml", *TINY, "--run-dir", str(run)]
    assert main([*words, "train.steps=2", "--resume", "auto"]) == 0  # nothing there: starts
    assert sorted(losses(run)) == [1, 2]
    assert main([*words, "--resume", "auto", "train.steps=3"]) == 0  # a checkpoint: continues
    assert sorted(losses(run)) == [1, 2, 3]
    assert main([*words, "--resume", "train.steps=4"]) == 0  # a bare --resume, then overrides
    assert sorted(losses(run)) == [1, 2, 3, 4]
    assert main([*words, "--resume", "maybe"]) == 2
    assert "--resume takes no value or 'auto'" in capsys.readouterr().err


def test_fsdp_resume_of_a_ddp_run_says_which_strategy_wrote_it(tmp_path, capsys):
    run = tmp_path / "run"
    one("configs/simmim/vit_tiny_fmnist.yaml", TINY, run, "train.steps=1")
    argv = ["pretrain", "configs/simmim/vit_tiny_fmnist.yaml", *TINY, "train.steps=2",
            "train.strategy=fsdp", "--allow-config-change", "--run-dir", str(run),
            "--resume"]  # fmt: skip
    assert main(argv) == 2
    assert "resume it with train.strategy=ddp" in capsys.readouterr().err


@pytest.mark.dist
def test_torchrun_restarts_a_killed_worker_and_ends_with_the_same_losses(tmp_path):
    """torchrun --max-restarts 3 ... --resume auto: SIGKILL one of two FSDP workers mid-run;
    the agent restarts both, they continue from the last checkpoint, and every logged loss
    equals an uninterrupted one-process run's."""
    ref, run = tmp_path / "ref", tmp_path / "elastic"
    words = [*AIM_TINY, "train.steps=40", "train.checkpoint_every=5", "train.strategy=fsdp"]
    one(AIM, words, ref)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           "2", "--max-restarts", "3", "-m", "mimar.cli", "pretrain", AIM, *words,
           "--run-dir", str(run), "--resume", "auto"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    agent = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)  # fmt: skip
    killed_at = None
    try:
        deadline = time.monotonic() + 240
        while killed_at is None and time.monotonic() < deadline and agent.poll() is None:
            time.sleep(0.05)
            logged = losses(run) if (run / "metrics.jsonl").is_file() else {}
            workers = _children(agent.pid)
            if len(logged) >= 12 and len(workers) == 2:
                os.kill(workers[-1], signal.SIGKILL)
                killed_at = max(logged)
        output, _ = agent.communicate(timeout=300)
    finally:
        if agent.poll() is None:
            agent.kill()
    assert killed_at is not None and killed_at < 40, "the run ended before a worker was killed"
    assert agent.returncode == 0, output[-3000:]
    assert sorted(losses(run)) == list(range(1, 41))
    assert_same_losses(ref, run, range(1, 41))


@pytest.mark.dist
def test_sigterm_to_the_torchrun_agent_saves_and_resume_auto_continues_exactly(tmp_path):
    """docs/reliability.md's torchrun case, measured: SIGTERM to the agent reaches both FSDP
    ranks, which stop together and save ``last.dcp`` at the same step; the agent itself exits
    1 with torch's own SignalException traceback (what a scheduler sees; torch's behaviour,
    pinned here so the docs stay true). The same command with ``--resume auto`` then runs to
    the end, every step logged once, with the losses of an uninterrupted one-process run."""
    ref, run = tmp_path / "ref", tmp_path / "run"
    words = [*AIM_TINY, "train.steps=40", "train.checkpoint_every=100", "train.strategy=fsdp"]
    one(AIM, words, ref)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           "2", "-m", "mimar.cli", "pretrain", AIM, *words, "--run-dir", str(run),
           "--resume", "auto"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    agent = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        while agent.poll() is None and len(losses(run) if (run / "metrics.jsonl").is_file()
                                            else {}) < 8:  # fmt: skip
            time.sleep(0.05)
        agent.send_signal(signal.SIGTERM)
        output, _ = agent.communicate(timeout=300)
    finally:
        if agent.poll() is None:
            agent.kill()
    stopped_at = max(losses(run))
    assert 8 <= stopped_at < 40, output[-3000:]
    assert agent.returncode == 1, output[-3000:]
    assert f"stopped by SIGTERM after step {stopped_at}; checkpoint saved" in output
    assert checkpoint.load(run / "checkpoints" / "last.dcp")["step"] == stopped_at
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming {run} from step {stopped_at}" in again.stderr
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 41))  # each step once
    assert_same_losses(ref, run, range(1, 41))


RESTARTED = """
import os, time, torch, torch.distributed as dist
from mimar.engine import dist as mdist
attempt, rank = int(os.environ["TORCHELASTIC_RESTART_COUNT"]), int(os.environ["RANK"])
if attempt == 1 and rank == 1:
    time.sleep(3)  # rank 0 looks up rank 1's address before rank 1 has published its new one
mdist.init("cpu")
x = torch.ones(1)
dist.all_reduce(x)
print(f"attempt {attempt} rank {rank} sum {x.item():.0f}", flush=True)
if attempt == 0 and rank == 1:
    os._exit(9)
time.sleep(1)
mdist.shutdown()
"""


@pytest.mark.dist
def test_a_restarted_worker_group_does_not_read_the_killed_groups_addresses(tmp_path):
    """torchrun's agent keeps one store across restarts; without a key prefix per attempt a
    restarted rank 0 reads the dead rank 1's gloo address and fails with "Connection refused"
    (what made the elastic test above flaky)."""
    script = tmp_path / "worker.py"
    script.write_text(RESTARTED)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           "2", "--max-restarts", "1", str(script)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "attempt 1 rank 0 sum 2" in done.stdout and "attempt 1 rank 1 sum 2" in done.stdout


def _children(pid: int) -> list[int]:
    """Live child process ids of ``pid`` (torchrun's workers), oldest first."""
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    return sorted(int(p) for p in out.stdout.split())


@pytest.mark.dist
def test_a_checkpoint_error_on_rank_0_stops_every_rank(tmp_path):
    """A save that fails on rank 0 (here: a folder where step 2's file goes) ends the job with
    its one-line error instead of leaving rank 1 waiting at a collective. Rank 1 raises the
    same error, but torchrun may stop it first once rank 0 has exited, so its line is not
    always printed."""
    run = tmp_path / "run"
    (run / "checkpoints" / "step_0000002.pt").mkdir(parents=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           "2", "-m", "mimar.cli", "pretrain", AIM, *AIM_TINY, "train.steps=4",
           "train.checkpoint_every=2", "--run-dir", str(run)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode != 0
    errors = [line for line in out.stderr.splitlines() if "mimar pretrain: error:" in line]
    assert 1 <= len(errors) <= 2, out.stderr[-2000:]  # rank 0's, and rank 1's if it printed
    for line in errors:  # rank 0's own error, or rank 1's pointer to it (either may print first)
        assert ("step_0000002.pt" in line and "previous checkpoint is intact" in line) or (
            "rank 0 could not write the checkpoint of step 2" in line
        ), line
