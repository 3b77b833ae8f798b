"""WebDataset shards: `mimar data shard`, the streaming ShardLoader (layout, exact resume) and
evaluation on shards (mimar/data/shards.py, mimar/data/shard_writer.py)."""

import io
import json
import os
import shutil
import signal
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import DEMO, TINY, losses
from PIL import Image

from mimar.cli import main
from mimar.data import DataConfig, load_images
from mimar.data.shard_loader import ShardLoader, build_shard_loader
from mimar.data.shard_writer import write_shards
from mimar.data.shards import count_samples, decode_sample, open_shards
from mimar.data.sources import normalization_stats
from mimar.engine.logger import MetricsLog
from mimar.errors import ConfigError, DataError

PER_CLASS, SHARD_SIZE = 20, 6  # 40 images -> 7 shards, the last one of 4: unequal sizes
SHARDS = "train-{000000..000006}.tar"


def _folder(root: Path, per_class: int, seed: int) -> Path:
    """Classes a (png) and b (jpg) of RGB images of assorted sizes (per-sample crops)."""
    rng = np.random.default_rng(seed)
    for c, ext in (("a", "png"), ("b", "jpg")):
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            h, w = rng.integers(18, 27, size=2)
            pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / c / f"{i}.{ext}")
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Train and val image folders, and their shards in one folder."""
    base = tmp_path_factory.mktemp("wds")
    train = _folder(base / "imgs" / "train", PER_CLASS, seed=0)
    val = _folder(base / "imgs" / "val", 4, seed=1)
    out = base / "shards"
    summary = write_shards(train, f"{out}/train-%06d.tar", shard_size=SHARD_SIZE, progress=False)
    write_shards(val, f"{out}/val-%06d.tar", shard_size=SHARD_SIZE, progress=False)
    return {"train": train, "val": val, "out": out, "summary": summary}


def _loader(data, *, seed=0, rank=0, world=1, workers=0, batch=8) -> ShardLoader:
    cfg = DataConfig(
        name="webdataset",
        root=str(data["out"] / SHARDS),
        img_size=16,
        in_chans=3,
        batch_size=batch,
        num_workers=workers,
    )
    mean, std = normalization_stats(cfg)
    return build_shard_loader(cfg, mean, std, seed=seed, rank=rank, world_size=world)


def _members(path: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(path) as tar:
        return tar.getmembers()


def test_shards_hold_every_image_once_with_its_bytes_and_class(data, tmp_path):
    out, summary = data["out"], data["summary"]
    shards = sorted(out.glob("train-*.tar"))
    assert [p.name for p in shards] == [f"train-{i:06d}.tar" for i in range(7)]
    assert summary == summary | {"shards": 7, "images": 40, "classes": 2, "root": f"{out}/{SHARDS}"}
    index = json.loads((out / "shards.json").read_text())
    assert index["classes"] == ["a", "b"]
    assert [index["shards"][p.name]["samples"] for p in shards] == [6] * 6 + [4]
    pairs = Counter()  # (encoded bytes, label) of every sample read back
    for path in shards:
        with tarfile.open(path) as tar:
            by_key: dict[str, dict] = {}
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                by_key.setdefault(key, {})[ext] = tar.extractfile(member).read()
        for sample in by_key.values():
            assert set(sample) in ({"png", "cls"}, {"jpg", "cls"})
            image = sample.get("png", sample.get("jpg"))
            pairs[image, int(sample["cls"])] += 1
    originals = Counter(
        (p.read_bytes(), "ab".index(c)) for c in "ab" for p in (data["train"] / c).iterdir()
    )
    assert pairs == originals  # the original encoded bytes, no re-encoding; labels kept
    first = [m.name for m in _members(shards[0])][:2]  # written in a shuffled order
    assert all(name[:8].isdigit() for name in first)
    assert count_samples(shards) == [6] * 6 + [4]  # the tar headers agree with the index


def test_shards_without_an_index_are_refused_until_indexed(data, tmp_path, capsys):
    """Shards from another tool (no shards.json): training and evaluation refuse them in
    one line naming `mimar data index`, which counts them once; then both read them."""
    bare = tmp_path / "bare"
    bare.mkdir()
    for path in data["out"].glob("*.tar"):
        shutil.copy(path, bare / path.name)
    root = str(bare / SHARDS)
    with pytest.raises(DataError, match=r"no shards\.json.*mimar data index '.*train-\{"):
        open_shards(root, (0.5,), (0.5,))  # training's loader
    cfg = DataConfig(name="webdataset", root=root, img_size=16, in_chans=3)
    with pytest.raises(DataError, match="mimar data index"):
        load_images(cfg, "train")  # evaluation's reader
    assert main(["data", "index", root, "--classes", "a,b"]) == 0
    assert "indexed 7 shards (40 samples, 2 classes)" in capsys.readouterr().out
    with pytest.raises(DataError, match=r"val-000000\.tar is not in it.*mimar data index"):
        load_images(cfg, "test")  # the val shards are not indexed yet
    assert main(["data", "index", str(bare / "val-*.tar")]) == 0  # a glob; classes kept
    index = json.loads((bare / "shards.json").read_text())
    mine = json.loads((data["out"] / "shards.json").read_text())
    assert index == mine  # the same counts, sizes and classes as data shard wrote
    assert len(open_shards(root, (0.5,), (0.5,))) == 40
    assert load_images(cfg, "test").classes == ["a", "b"]
    assert "not found" in _error(["data", "index", str(bare / "nope-{0..1}.tar")], capsys)


def test_shard_order_is_a_permutation_of_seed_and_pass(data):
    loader = _loader(data)
    orders = {
        (s, p): tuple(_loader(data, seed=s).data.stream_shards(p, 0))
        for s in (0, 1)
        for p in (0, 1)
    }
    assert all(sorted(order) == list(range(7)) for order in orders.values())
    assert len(set(orders.values())) == 4  # each seed and pass its own order
    assert tuple(loader.data.stream_shards(1, 0)) == orders[0, 1]  # a function of (seed, pass) only


def test_ranks_and_workers_read_every_sample_once_per_pass(data):
    for world, workers in ((1, 1), (2, 2), (1, 3)):
        seen = Counter()
        for rank in range(world):
            loader = _loader(data, rank=rank, world=world, workers=workers)
            for stream in range(loader.data.streams):
                shards = loader.data.stream_shards(0, stream)
                n = sum(loader.images.counts[s] for s in shards)
                samples = loader.data.stream_samples(stream, 0)
                for _ in range(n):  # the stream's pass 0
                    pass_index, shard, index, _sample = next(samples)
                    assert pass_index == 0 and shard in shards
                    seen[shard, index] += 1
        assert sorted(seen) == [(s, i) for s in range(7) for i in range(6 if s < 6 else 4)]
        assert set(seen.values()) == {1}, (world, workers)


def test_resumed_loader_yields_the_batches_of_an_uninterrupted_one(data):
    """The exact-resume claim at loader level: 2 ranks x 2 workers, per-rank batch 4 from
    shards of 6, restarted mid-shard (step 3) and after a pass boundary (step 7)."""
    for rank in (0, 1):
        full = _loader(data, rank=rank, world=2, workers=2)
        batches = [full.inputs(t)["images"] for t in range(10)]
        assert batches[0].shape == (4, 3, 16, 16)
        for start in (3, 7):
            resumed = _loader(data, rank=rank, world=2, workers=2)
            for t in range(start, 10):
                assert torch.equal(resumed.inputs(t)["images"], batches[t]), (rank, start, t)
        assert torch.equal(full.batch(5), batches[5])  # the in-process reader agrees
    other = _loader(data, rank=0, world=2, workers=2, seed=1)
    assert not torch.equal(other.inputs(0)["images"], _loader(data, world=2, workers=2).batch(0))


def _pretrain(data, run, *extra, resume=False):
    words = [f"data.root={data['out'] / SHARDS}", "data.batch_size=8", "data.in_chans=3"]
    words += ["backbone.in_chans=3", "data.name=webdataset", "data.num_workers=2"]
    argv = ["pretrain", DEMO, *TINY, *words, *extra, "--run-dir", str(run)]
    return main(argv + ["--resume"] * resume)


def test_pretraining_resumed_mid_epoch_logs_the_losses_of_an_uninterrupted_run(
    data, tmp_path, monkeypatch
):
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert _pretrain(data, full, "train.steps=8") == 0  # 5 steps per epoch: crosses a pass
    write = MetricsLog.write

    def write_then_signal(self, row):
        write(self, row)
        if row["step"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(MetricsLog, "write", write_then_signal)
    assert _pretrain(data, cut, "train.steps=8") == 128 + signal.SIGTERM
    monkeypatch.setattr(MetricsLog, "write", write)
    assert _pretrain(data, cut, "train.steps=8", resume=True) == 0
    assert losses(cut) == losses(full)  # exact equality on CPU
    rows = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["epoch"] == pytest.approx(8 / 5) and (full / "reconstruction.png").exists()
    data["run"] = full


def test_eval_reads_the_train_and_val_shards(data, tmp_path):
    cfg = DataConfig(name="webdataset", root=str(data["out"] / SHARDS), img_size=16, in_chans=3)
    train, test = load_images(cfg, "train"), load_images(cfg, "test")
    assert (len(train), len(test)) == (40, 8) and train.images.shape[1:] == (3, 16, 16)
    assert train.classes == ["a", "b"] and sorted(test.labels.tolist()) == [0] * 4 + [1] * 4
    run = data.get("run")  # the run of the test above, unless pytest-xdist ran it elsewhere
    if run is None:
        run = tmp_path / "run"
        assert _pretrain(data, run, "train.steps=2") == 0
    assert main(["eval", "knn", "--checkpoint", str(run), "--k", "3", "--device", "cpu"]) == 0
    result = json.loads((run / "eval" / "knn.json").read_text())
    assert (result["n_train"], result["n_test"]) == (40, 8)


def _error(argv, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_bad_input_gets_one_line(data, tmp_path, capsys):
    out = f"{tmp_path}/s/train-%06d.tar"
    assert "does not exist" in _error(["data", "shard", str(tmp_path / "nope"), out], capsys)
    (tmp_path / "empty").mkdir()
    assert "no images" in _error(["data", "shard", str(tmp_path / "empty"), out], capsys)
    folder = str(data["train"])
    assert "%d-style" in _error(["data", "shard", folder, f"{tmp_path}/train.tar"], capsys)
    assert "--shard-size" in _error(["data", "shard", folder, out, "--shard-size", "0"], capsys)
    existing = str(data["out"] / "train-%06d.tar")
    assert "already holds" in _error(["data", "shard", folder, existing], capsys)
    splits = str(data["train"].parent)
    assert "shard each one" in _error(["data", "shard", splits, out], capsys)
    # 7 shards cannot feed 8 workers; a missing shard; a val split that is not there
    err = _error(["pretrain", DEMO, *_words(data, SHARDS), "data.num_workers=8"], capsys)
    assert "every worker needs a shard" in err
    err = _error(["pretrain", DEMO, *_words(data, "train-{000000..000009}.tar")], capsys)
    assert "3 of the 10 shards" in err
    cfg = DataConfig(name="webdataset", root=str(tmp_path / "x-{0..1}.tar"))
    with pytest.raises(FileNotFoundError, match="no test split"):
        load_images(cfg, "test")


def _words(data, shards):
    run = ["--run-dir", str(data["out"].parent / "never")]
    return [f"data.root={data['out'] / shards}", "data.name=webdataset", *TINY[1:], *run]


def _damage_one_png(shard: Path) -> None:
    """Rewrite ``shard`` with the bytes of its first png replaced (images damaged after
    packing: the writer checks what it packs)."""
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    damaged = next(i for i, (m, _) in enumerate(members) if m.name.endswith(".png"))
    members[damaged] = (members[damaged][0], b"not a png")
    with tarfile.open(shard, "w") as tar:
        for member, payload in members:
            member.size = len(payload)
            tar.addfile(member, io.BytesIO(payload))


def test_a_corrupt_image_names_its_sample(tmp_path):
    folder = _folder(tmp_path / "imgs", 4, seed=2)
    write_shards(folder, f"{tmp_path}/out/train-%06d.tar", shard_size=100, progress=False)
    root = str(tmp_path / "out/train-000000.tar")
    _damage_one_png(Path(root))
    for policy, batch in (("error", 8), ("skip", 7)):
        cfg = DataConfig(
            name="webdataset", root=root, in_chans=3, batch_size=batch, on_bad_image=policy
        )
        loader = build_shard_loader(cfg, *normalization_stats(cfg), seed=0)
        if policy == "error":
            with pytest.raises(DataError, match="cannot decode sample .* data.on_bad_image=skip"):
                loader.inputs(0)
        else:  # the 7 good images fill the batch
            assert loader.inputs(0)["images"].shape[0] == 7


def test_the_writer_checks_every_image(tmp_path, capsys):
    """An unreadable file stops `mimar data shard` in one line naming it, leaving no shards;
    --on-bad-image skip leaves it out and says so."""
    folder = _folder(tmp_path / "imgs", 6, seed=3)
    (folder / "a" / "2.png").write_bytes(b"\x89PNG but not really")
    out = tmp_path / "out"
    argv = ["data", "shard", str(folder), f"{out}/train-%06d.tar", "--shard-size", "4"]
    err = _error(argv, capsys)
    assert f"cannot read {folder / 'a' / '2.png'}" in err and "--on-bad-image skip" in err
    assert not list(out.glob("*.tar"))
    assert main([*argv, "--on-bad-image", "skip"]) == 0
    captured = capsys.readouterr()
    assert "left out 1 unreadable image(s)" in captured.err and "(11 images" in captured.out
    counts = json.loads((out / "shards.json").read_text())["shards"]
    assert sum(c["samples"] for c in counts.values()) == 11 and len(counts) == 3
    assert sum(len(_members(p)) for p in out.glob("*.tar")) == 11 * 2  # image + cls each


def test_missing_webdataset_names_the_extra(data, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "webdataset" else find_spec(name, *a),
    )
    with pytest.raises(ConfigError, match=r"pip install 'mimar\[webdataset\]'"):
        _loader(data)
    with pytest.raises(ConfigError, match=r"pip install 'mimar\[webdataset\]'"):
        write_shards(data["train"], "x/train-%06d.tar")


def test_decoding_keeps_the_stored_pixels(data):
    """Lossless png samples decode to the file's own pixels (no resampling on the way)."""
    path = data["train"] / "a" / "3.png"
    pixels = np.array(Image.open(path))
    sample = {"__key__": "x", "png": path.read_bytes()}
    assert torch.equal(decode_sample(sample, 3), torch.from_numpy(pixels).permute(2, 0, 1))
    gray = decode_sample(sample, 1)
    assert gray.shape == (1, *pixels.shape[:2])


def test_the_monitor_on_shards_without_a_test_split_keeps_health_only(data, tmp_path):
    """Train shards alone (no val-/test- shards beside them): the monitor says so once and
    logs RankMe without the online kNN, instead of stopping the run (acceptance I6's case)."""
    alone = tmp_path / "alone"
    alone.mkdir()
    for shard in data["out"].glob("train-*.tar"):
        shutil.copy(shard, alone / shard.name)
    shutil.copy(data["out"] / "shards.json", alone / "shards.json")
    run = tmp_path / "run"
    words = [f"data.root={alone / SHARDS}", "data.batch_size=8", "data.in_chans=3"]
    words += ["backbone.in_chans=3", "data.name=webdataset", "train.steps=2"]
    words += ["train.monitor_every=2", "train.monitor_bank=16"]
    assert main(["pretrain", DEMO, *TINY, *words, "--run-dir", str(run)]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("monitor/rankme" in r for r in rows)
    assert not any("monitor/knn_top1" in r for r in rows)


def test_a_negative_label_is_refused():
    """A negative cls would index the class list from its end: another class, silently."""
    from mimar.data.shards import _labels

    samples = [{"__key__": "0", "cls": b"1"}, {"__key__": "1", "__url__": "s.tar", "cls": b"-1"}]
    with pytest.raises(DataError, match="sample 1 of s.tar: cls must be >= 0, got -1"):
        _labels(samples)
    assert _labels(samples[:1]).tolist() == [1]
