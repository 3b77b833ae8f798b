"""The fault table: kill -9 mid-run then resume, corrupt checkpoints, bad config values, and
the hostile-world classes of issue 27 (labels, run lock, writes, pipes, recipes, sizes, signals).

    python -m benchmarks.faults                  # 10 kills, every corruption, every key x value
    python -m benchmarks.faults --kills 3 --parts kill

- kill: a tiny SimMIM run (``train.checkpoint_every=3``, 1 thread) is SIGKILLed once its
  log reaches a random step between 1 and 59, resumed with ``--resume auto`` until it
  finishes, and its logged losses compared with an uninterrupted run's: "resumed exactly"
  counts runs whose every loss is equal (bit for bit; one process, fixed thread count).
- corrupt: a finished run's ``last.pt`` and an FSDP run's ``last.dcp/`` get damaged (bytes
  flipped in the tensor data at random offsets, truncations, an empty file, random bytes, a
  foreign pickle, a torch file without our keys, a missing or altered DCP file); each is read
  by ``mimar.engine.checkpoint.load`` (what resume, eval and export call): "refused clearly"
  counts one-line ``CheckpointError`` / ``MissingFileError``; an accepted load or any other
  exception is listed.
- config: every key of every tiny recipe set to each of a list of bad and odd values through
  ``load_config``: "clear error" counts one-line ``ConfigError``s, "valid" the values that make
  a valid config; any other exception is listed.
- hostile: one trial per class of issue 27, each "held" or "FAILED" (``--parts hostile``).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RECIPE = "configs/simmim/vit_tiny_fmnist.yaml"
TINY = [
    "data.name=synthetic", "data.synthetic_size=256", "data.batch_size=16", "data.img_size=16",
    "backbone.img_size=16", "backbone.embed_dim=32", "backbone.depth=2", "backbone.num_heads=2",
    "method.mask_patch_size=8", "train.precision=fp32", "train.progress=false",
    "train.threads=1", "train.steps=60", "train.checkpoint_every=3",
]  # fmt: skip
BAD_VALUES = ["-1", "0", "1e30", ".nan", ".inf", "abc", "[]", "{}", "true", "null", "[1, 2, 3]",
              "'", "[", "!!python/name:os.system", "2.5", "-0.5"]  # fmt: skip


def pretrain(run: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "mimar.cli", "pretrain", RECIPE, *TINY, *extra,
           "--run-dir", str(run), "--resume", "auto"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip


def losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def part_kill(args, tmp: Path) -> tuple[int, int]:
    ref = tmp / "ref"
    assert pretrain(ref).wait() == 0
    rng, exact = random.Random(0), 0
    for trial in range(args.kills):
        run, target = tmp / f"kill{trial}", rng.randrange(1, 60)  # a step strictly mid-run
        proc = pretrain(run)
        while proc.poll() is None and _last_step(run) < target:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        logged = _last_step(run)
        while (proc := pretrain(run)).wait() != 0:  # --resume auto: continue or start over
            raise SystemExit(f"resume of trial {trial} failed: {proc.stderr.read()[-500:]}")
        same = losses(run) == losses(ref)
        exact += same
        outcome = "exactly" if same else "with DIFFERENT losses"
        print(f"kill trial {trial}: SIGKILL after step {logged} of 60, resumed {outcome}")
    return args.kills, exact


def _last_step(run: Path) -> int:
    try:
        return max(losses(run), default=0)
    except (OSError, ValueError):  # not there yet, or a line being written
        return 0


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def corruptions(last: Path, tmp: Path, rng: random.Random):
    """(name, damaged path) pairs made from the checkpoint file ``last``."""
    data = last.read_bytes()
    for i in range(20):
        bad = bytearray(data)
        pos = rng.randrange(len(bad) // 4, len(bad) - 1024)  # past the zip header: tensor data
        bad[pos] ^= 1 << rng.randrange(8)
        yield f"flipped bit at {pos}", _write(tmp / f"flip{i}.pt", bytes(bad))
    for i, frac in enumerate((0.0, 0.1, 0.5, 0.9, 0.999)):
        yield (
            f"truncated to {frac:.1%}",
            _write(tmp / f"trunc{i}.pt", data[: int(len(data) * frac)]),
        )
    yield "random bytes", _write(tmp / "random.pt", rng.randbytes(4096))
    yield "foreign pickle", _write(tmp / "foreign.pt", pickle.dumps(random.Random()))
    torch.save({"weights": torch.zeros(3)}, tmp / "nokeys.pt")
    yield "torch file without mimar keys", tmp / "nokeys.pt"
    torch.save([1, 2, 3], tmp / "list.pt")
    yield "torch file holding a list", tmp / "list.pt"


def dcp_corruptions(folder: Path, tmp: Path, rng: random.Random):
    shards = sorted(p.name for p in folder.glob("*.distcp"))
    for i in range(10):
        bad = tmp / f"dcp-flip{i}.dcp"
        shutil.copytree(folder, bad)
        shard = bad / rng.choice(shards)
        data = bytearray(shard.read_bytes())
        pos = rng.randrange(len(data))
        data[pos] ^= 1 << rng.randrange(8)
        shard.write_bytes(bytes(data))
        yield f"DCP: flipped bit in {shard.name}", bad
    for name in (*shards, "mimar.pt", ".metadata"):
        bad = tmp / f"dcp-no{name}.dcp"
        shutil.copytree(folder, bad)
        (bad / name).unlink()
        yield f"DCP: {name} missing", bad


def part_corrupt(args, tmp: Path) -> tuple[int, int, list[str]]:
    from mimar.engine import checkpoint
    from mimar.errors import CheckpointError, MissingFileError

    rng = random.Random(0)
    ddp, sharded = tmp / "c-ddp", tmp / "c-fsdp"
    assert pretrain(ddp, "train.steps=3").wait() == 0
    assert pretrain(sharded, "train.steps=3", "train.strategy=fsdp").wait() == 0
    cases = [
        *corruptions(ddp / "checkpoints" / "last.pt", tmp, rng),
        *dcp_corruptions(sharded / "checkpoints" / "last.dcp", tmp, rng),
    ]
    original = checkpoint.content_hash(checkpoint.load(ddp / "checkpoints" / "last.pt"))
    clear, harmless, problems = 0, 0, []
    for name, path in cases:
        try:
            state = checkpoint.load(path)
            if checkpoint.content_hash(state) == original:  # zip padding, CRC fields, ...
                harmless += 1
            else:
                problems.append(f"{name}: accepted")
        except (CheckpointError, MissingFileError) as err:
            if "\n" in str(err):
                problems.append(f"{name}: a multi-line error")
            else:
                clear += 1
        except Exception as err:  # noqa: BLE001 - what the table counts
            problems.append(f"{name}: {type(err).__name__}: {str(err)[:100]}")
    return len(cases), clear, harmless, problems


def part_config() -> tuple[int, int, int, list[str]]:
    import mimar
    from mimar.config import ConfigError, dotted_keys, to_dict

    tried = clear = valid = 0
    problems: list[str] = []
    for recipe in sorted(ROOT.glob("configs/*/*_fmnist.yaml")):
        for key in dotted_keys(to_dict(mimar.load_config(recipe))):
            for value in BAD_VALUES:
                tried += 1
                try:
                    mimar.load_config(recipe, [f"{key}={value}"])
                    valid += 1
                except ConfigError as err:
                    clear += "\n" not in str(err)
                except Exception as err:  # noqa: BLE001
                    problems.append(f"{recipe.name} {key}={value}: {type(err).__name__}")
    return tried, clear, valid, problems


def _cli(*argv: str, **popen) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "mimar.cli", *argv], cwd=ROOT, env=env,
                            text=True, **popen)  # fmt: skip


def _one_line(err: str) -> bool:
    lines = [line for line in err.strip().splitlines() if line.startswith("mimar ")]
    return len(lines) == 1 and "Traceback" not in err


def _trial_labels(tmp: Path) -> bool:
    """An empty class folder sorting first, and a test class unknown to training."""
    import numpy as np
    from PIL import Image

    from mimar.data import DataConfig, load_images
    from mimar.errors import DataError

    for name in ("ref", "hostile", "unknown"):
        for split in ("train", "val"):
            for k, c in enumerate(["dress", "zebra" if name == "unknown" and split == "val"
                                   else "shirt"]):  # fmt: skip
                (tmp / name / split / c).mkdir(parents=True)
                image = Image.fromarray(np.full((8, 8), 90 * k, np.uint8))
                image.save(tmp / name / split / c / "0.png")
    (tmp / "hostile" / "train" / "000_empty").mkdir()
    cfg = lambda root: DataConfig(name="image_folder", root=str(root), img_size=8, in_chans=1)  # noqa: E731
    labels = {n: [load_images(cfg(tmp / n), s).labels.tolist() for s in ("train", "test")]
              for n in ("ref", "hostile")}  # fmt: skip
    same = labels["ref"] == labels["hostile"]
    try:
        load_images(cfg(tmp / "unknown"), "test")
        return False
    except DataError as err:
        return same and "zebra" in str(err)


def _trial_lock(tmp: Path) -> bool:
    run = tmp / "live"
    first = _cli("pretrain", RECIPE, *TINY[:-2], "train.steps=100000", "--run-dir", str(run),
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        while not (run / "metrics.jsonl").exists():
            time.sleep(0.2)
        second = _cli("pretrain", RECIPE, *TINY, "--run-dir", str(run), "--resume", "auto",
                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
        _, err = second.communicate(timeout=120)
        return _one_line(err) and f"process {first.pid} " in err
    finally:
        first.kill()
        first.wait()


def _trial_pipe(tmp: Path) -> bool:
    run = tmp / "pipe"
    proc = _cli("pretrain", RECIPE, *TINY, "train.log_every=1", "--run-dir", str(run),
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    proc.stdout.readline()
    proc.stdout.close()
    return proc.wait(timeout=300) == 0 and len(losses(run)) == 60


def _trial_recipes(tmp: Path) -> bool:
    from mimar.config import load_config
    from mimar.errors import ConfigError

    base = ROOT / RECIPE
    bomb = ["x0: &x0 [" + ", ".join(["0.25"] * 10) + "]"]
    bomb += [f"x{i}: &x{i} [" + ", ".join([f"*x{i - 1}"] * 10) + "]" for i in range(1, 10)]
    texts = ["\n".join([*bomb, f"base: {base}", "data: {mean: *x9}"]) + "\n",
             "a: " + "[" * 5000 + "]" * 5000 + "\n",
             "optim:\n  lr: 1.0\noptim:\n  weight_decay: 0.1\n"]  # fmt: skip
    ok = True
    for i, text in enumerate(texts):
        (tmp / f"r{i}.yaml").write_text(text)
        start = time.perf_counter()
        try:
            load_config(tmp / f"r{i}.yaml")
            ok = False
        except ConfigError as err:
            ok &= time.perf_counter() - start < 1 and len(str(err)) < 600
    return ok


def _trial_resume_copy(tmp: Path) -> bool:
    """Class 3: config.yaml edited to agree with a change; the resume still refuses it."""
    import yaml

    run = tmp / "copy"
    done = _cli("pretrain", RECIPE, *TINY[:-2], "train.steps=2", "--run-dir", str(run),
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).wait(timeout=300)  # fmt: skip
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["optim"]["lr"] = 0.5
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    resume = ["train.steps=3", "optim.lr=0.5", "--run-dir", str(run), "--resume"]
    proc = _cli("pretrain", RECIPE, *TINY[:-2], *resume, stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE)  # fmt: skip
    _, err = proc.communicate(timeout=300)
    return done == 0 and proc.returncode == 2 and _one_line(err) and "optim.lr" in err


def _trial_dcp_eval(tmp: Path) -> bool:
    """Class 4: eval of RUN/checkpoints/last.dcp writes RUN/eval, nothing inside the DCP."""
    run = tmp / "dcp"
    done = _cli("pretrain", RECIPE, *TINY[:-2], "train.steps=2", "train.strategy=fsdp",
                "--run-dir", str(run), stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL).wait(timeout=300)  # fmt: skip
    last = run / "checkpoints" / "last.dcp"
    inside = sorted(p.name for p in last.iterdir())
    proc = _cli("eval", "knn", "--checkpoint", str(last), "--max-train", "64",
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    return (
        done == 0
        and proc.wait(timeout=300) == 0
        and (run / "eval" / "knn.json").is_file()
        and sorted(p.name for p in last.iterdir()) == inside
    )


def _trial_partial(tmp: Path) -> bool:
    """Class 10: shards with no shards.json (a killed `mimar data shard`, or another tool's)
    and a truncated export .json are one line each."""
    import numpy as np
    from PIL import Image

    for c in ("a", "b"):
        (tmp / "img" / "train" / c).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(np.full((8, 8), 60 * i, np.uint8)).save(
                tmp / "img/train" / c / f"{i}.png"
            )
    pattern = str(tmp / "shards" / "train-%06d.tar")
    shard = _cli("data", "shard", str(tmp / "img" / "train"), pattern, "--shard-size", "4",
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    shard = shard.wait(timeout=300)
    (tmp / "shards" / "shards.json").unlink()  # as a kill before the index, or another tool
    root = str(tmp / "shards" / "train-{000000..000001}.tar")
    train = _cli("pretrain", RECIPE, *TINY[:-2], "train.steps=1", "data.name=webdataset",
                 f"data.root={root}", "--run-dir", str(tmp / "run"),
                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    _, err = train.communicate(timeout=300)
    refused = train.returncode == 2 and _one_line(err) and "mimar data index" in err
    run, out = tmp / "ok", tmp / "x.safetensors"
    _cli("pretrain", RECIPE, *TINY[:-2], "train.steps=1", "--run-dir", str(run),
         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).wait(timeout=300)  # fmt: skip
    _cli("export", "--checkpoint", str(run), "--out", str(out),
         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).wait(timeout=300)  # fmt: skip
    meta = out.with_suffix(".json")
    meta.write_text(meta.read_text()[:40])
    ev = _cli("eval", "finetune", "--checkpoint", str(out), stdout=subprocess.DEVNULL,
              stderr=subprocess.PIPE)  # fmt: skip
    _, err = ev.communicate(timeout=300)
    return shard == 0 and refused and ev.returncode == 2 and _one_line(err)


def _trial_signal(tmp: Path, name: str) -> bool:
    run = tmp / f"sig-{name}"
    proc = _cli("pretrain", RECIPE, *TINY[:-2], "train.steps=100000", "--run-dir", str(run),
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    while not (run / "metrics.jsonl").exists():
        time.sleep(0.2)
    proc.send_signal(getattr(signal, name))
    _, err = proc.communicate(timeout=120)
    code = 128 + int(getattr(signal, name))
    return (
        proc.returncode == code
        and (run / "checkpoints" / "last.pt").is_file()
        and ("Traceback" not in err)
    )


def _trial_sizes(tmp: Path) -> bool:
    ok = True
    for extra in (["backbone.embed_dim=1048576"], ["backbone.depth=100000"],
                  ["data.img_size=100000", "backbone.img_size=100000"]):  # fmt: skip
        start = time.perf_counter()
        proc = _cli("pretrain", RECIPE, *extra, "--run-dir", str(tmp / "size"),
                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
        _, err = proc.communicate(timeout=120)
        ok &= _one_line(err) and "cannot fit" in err and time.perf_counter() - start < 30
    return ok


def _trial_harness(tmp: Path) -> bool:
    """tests/test_faults.py: every write site x ENOSPC / EROFS / torch's error, real tmpfs."""
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          "-m", "slow or not slow", "tests/test_faults.py"], cwd=ROOT,
                         capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    return out.returncode == 0


HOSTILE = [
    ("1 labels: empty class folder first; test class unknown to training", _trial_labels),
    ("2 a second pretrain / --resume auto on a live run folder", _trial_lock),
    ("3 config.yaml edited to agree with a changed lr, then --resume", _trial_resume_copy),
    ("4 eval knn of RUN/checkpoints/last.dcp (one-process FSDP)", _trial_dcp_eval),
    ("5 every write site fails (ENOSPC, EROFS, torch), real full tmpfs", _trial_harness),
    ("6 stdout+stderr closed after one line (2>&1 piped into head -1)", _trial_pipe),
    ("7 alias bomb (10^9 values), 5000-deep nesting, a repeated section", _trial_recipes),
    ("8 embed_dim=1048576, depth=100000, img_size=100000", _trial_sizes),
    ("9 SIGHUP to a training run", lambda tmp: _trial_signal(tmp, "SIGHUP")),
    ("10 shards without shards.json; a truncated export .json", _trial_partial),
]


def part_hostile(tmp: Path) -> list[str]:
    rows = []
    for i, (name, trial) in enumerate(HOSTILE):
        folder = tmp / f"hostile{i}"
        folder.mkdir()
        start = time.perf_counter()
        try:
            ok = trial(folder)
        except Exception as err:  # noqa: BLE001 - what the table counts
            ok, name = False, f"{name} ({type(err).__name__}: {str(err)[:80]})"
        seconds = time.perf_counter() - start
        rows.append(f"| {name} | 1 | {'held' if ok else 'FAILED'} ({seconds:.0f} s) |")
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parts", nargs="+", default=["kill", "corrupt", "config", "hostile"])
    parser.add_argument("--kills", type=int, default=10)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="mimar-faults-") as tmp:
        if "kill" in args.parts:
            n, exact = part_kill(args, Path(tmp))
            rows.append(
                f"| kill -9 mid-run, then `--resume auto` | {n} | {exact} resumed exactly |"
            )
        if "corrupt" in args.parts:
            n, clear, harmless, problems = part_corrupt(args, Path(tmp))
            rows.append(
                f"| corrupt checkpoints (file and DCP) | {n} | {clear} refused in one line, "
                f"{harmless} harmless (the bytes hit no value: the loaded state is the saved "
                f"one), {len(problems)} accepted or unclear |"
            )
            print(*problems, sep="\n")
        if "config" in args.parts:
            n, clear, valid, problems = part_config()
            rows.append(f"| bad config values (every key x {len(BAD_VALUES)} values) | {n} | "
                        f"{clear} one-line ConfigError, {valid} valid, "
                        f"{len(problems)} other |")  # fmt: skip
            print(*problems[:20], sep="\n")
        if "hostile" in args.parts:
            rows += part_hostile(Path(tmp))
    print("\n| fault | tried | outcome |\n|---|---|---|")
    print(*rows, sep="\n")


if __name__ == "__main__":
    main()
