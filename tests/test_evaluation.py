"""Tests for mimar.evaluation: features, weighted kNN, linear probe, the training loop, reports."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from rich.console import Console
from torch import nn

from mimar.engine.checkpoint import atomic_write, save_atomic
from mimar.evaluation import (
    extract_features,
    knn_classify,
    knn_predict,
    linear_probe,
    print_results,
    results_table,
    write_json,
)
from mimar.evaluation.knn import _Groups
from mimar.evaluation.linear import _train_heads
from mimar.evaluation.train import fit
from mimar.protocols import PROTOCOL_TABLE, PROTOCOLS, request

# --------------------------------------------------------------------------- feature extraction


class TinyBackbone(nn.Module):
    """Backbone-contract toy with outputs computable by hand.

    Identity patch embed (2x2 patches of a 3x4x4 image -> 4 tokens of width 12), prefix tokens
    filled with 100, block i adds i + 1 to every token, the "final norm" halves the tokens.
    """

    patch_size = out_stride = 2
    in_chans = 3
    img_size = 4
    num_layers = 3
    embed_dim = 12

    def __init__(self, num_prefix_tokens: int = 1):
        super().__init__()
        self.num_prefix_tokens = num_prefix_tokens
        self.patch_embed = nn.Linear(12, 12, bias=False)
        with torch.no_grad():
            self.patch_embed.weight.copy_(torch.eye(12))
        self.calls: list[tuple[bool, bool]] = []  # (training, inference mode) seen per forward

    def forward(self, images, *, mask=None, keep_ids=None, attn_mask=None, return_layers=()):
        self.calls.append((self.training, torch.is_inference_mode_enabled()))
        B = images.shape[0]
        patches = images.unfold(2, 2, 2).unfold(3, 2, 2)  # (B, C, 2, 2, p, p)
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(B, 4, 12)  # (B, N, C*p*p)
        x = self.patch_embed(patches)  # (B, N, D)
        prefix = torch.full((B, self.num_prefix_tokens, 12), 100.0, device=x.device)
        x = torch.cat([prefix, x], dim=1)  # (B, P+N, D)
        layers = []
        for i in range(self.num_layers):
            x = x + (i + 1)
            layers.append(x)
        out = {"tokens": 0.5 * x}
        if return_layers:
            out["layers"] = [layers[i] for i in return_layers]
        return out

    def layer_id(self, name: str) -> int:
        return 0

    def no_weight_decay(self) -> set[str]:
        return set()


def _patch_mean(images: torch.Tensor) -> torch.Tensor:
    """Mean of the flattened 2x2 patches, patchified by reshape (independent of the unfold)."""
    B = images.shape[0]
    patches = images.reshape(B, 3, 2, 2, 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(B, 4, 12)
    return patches.mean(dim=1)  # (B, 12)


@pytest.fixture
def image_batches():
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(5, 3, 4, 4, generator=gen)
    labels = torch.tensor([3, 1, 4, 1, 5])
    return images, labels, [(images[:3], labels[:3]), (images[3:], labels[3:])]


def test_extract_avg_excludes_prefix_and_matches_hand_mean(image_batches):
    images, labels, batches = image_batches
    feats, got_labels = extract_features(TinyBackbone(), batches)
    assert feats.shape == (5, 12) and feats.dtype == torch.float32
    # final tokens = 0.5 * (patch + 1 + 2 + 3); the class token (100) must not leak in
    torch.testing.assert_close(feats, 0.5 * (_patch_mean(images) + 6))
    assert torch.equal(got_labels, labels)
    assert not feats.is_inference()  # usable in autograd by the probes


def test_extract_cls_and_layer_taps(image_batches):
    images, _, batches = image_batches
    backbone = TinyBackbone()
    cls_final, _ = extract_features(backbone, batches, pool="cls")
    torch.testing.assert_close(cls_final, torch.full((5, 12), 0.5 * (100 + 6)))
    cls_block1, _ = extract_features(backbone, batches, pool="cls", layer=1)
    torch.testing.assert_close(cls_block1, torch.full((5, 12), 100.0 + 1 + 2))
    avg_block0, _ = extract_features(backbone, batches, layer=0)
    torch.testing.assert_close(avg_block0, _patch_mean(images) + 1)  # raw block 0, no norm
    avg_last, _ = extract_features(backbone, batches, layer=-1)
    torch.testing.assert_close(avg_last, _patch_mean(images) + 6)


def test_extract_without_prefix_tokens(image_batches):
    images, _, batches = image_batches
    backbone = TinyBackbone(num_prefix_tokens=0)
    feats, _ = extract_features(backbone, batches)
    torch.testing.assert_close(feats, 0.5 * (_patch_mean(images) + 6))
    with pytest.raises(ValueError, match="class token"):
        extract_features(backbone, batches, pool="cls")
    with pytest.raises(ValueError, match="pool"):
        extract_features(backbone, batches, pool="max")  # type: ignore[arg-type]


@pytest.mark.parametrize("training", [True, False])
def test_extract_runs_eval_inference_mode_and_restores_mode(image_batches, training):
    _, _, batches = image_batches
    backbone = TinyBackbone().train(training)
    extract_features(backbone, batches)
    assert backbone.calls == [(False, True), (False, True)]
    assert backbone.training is training
    with pytest.raises(RuntimeError):  # a failing forward still restores the mode
        extract_features(backbone, [(torch.randn(2, 5, 4, 4), None)])
    assert backbone.training is training


def test_extract_labels_none_progress_and_generators(image_batches):
    images, _, _ = image_batches
    unlabelled = ((images[i : i + 2], None) for i in range(0, 5, 2))  # no __len__
    feats, labels = extract_features(TinyBackbone(), unlabelled, progress=True)
    assert feats.shape == (5, 12) and labels is None
    feats, _ = extract_features(TinyBackbone(), [(images, None)], progress=True)
    assert feats.shape == (5, 12)
    with pytest.raises(ValueError, match="labels"):
        extract_features(TinyBackbone(), [(images[:2], torch.tensor([0, 1])), (images[2:], None)])


def test_extract_autocast_returns_float32(image_batches):
    images, _, batches = image_batches
    feats, _ = extract_features(TinyBackbone(), batches, autocast_dtype=torch.bfloat16)
    assert feats.dtype == torch.float32
    torch.testing.assert_close(feats, 0.5 * (_patch_mean(images) + 6), rtol=3e-2, atol=3e-2)


@pytest.fixture
def two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def test_extract_on_worker_threads_equals_one_thread_in_order(two_threads, monkeypatch):
    """Two intra-op threads -> two worker threads of one each, pieces of CPU_CHUNK images: the
    same features (bitwise: the same one-thread kernels) and labels, in order, as one thread;
    the thread count is restored, also when a forward fails."""
    from mimar.backbones.vit import ViT, ViTConfig
    from mimar.evaluation import features

    torch.manual_seed(0)
    vit = ViT(ViTConfig(img_size=8, patch_size=2, in_chans=1, embed_dim=16, depth=2, num_heads=2))
    images, labels = torch.randn(150, 1, 8, 8), torch.arange(150)
    batches = [(images[:100], labels[:100]), (images[100:], labels[100:])]  # pieces 64, 36, 50
    monkeypatch.setattr(features, "CPU_CHUNK", 64)
    assert features.CPU_WORKERS
    got, got_labels = extract_features(vit, batches, autocast_dtype=torch.bfloat16)
    assert torch.get_num_threads() == 2
    torch.set_num_threads(1)
    want, _ = extract_features(vit, batches, autocast_dtype=torch.bfloat16)
    assert torch.equal(got, want) and torch.equal(got_labels, labels)
    torch.set_num_threads(2)
    with pytest.raises(RuntimeError):  # 3 channels into a 1-channel patch embedding
        extract_features(vit, [(torch.randn(4, 3, 8, 8), None)])
    assert torch.get_num_threads() == 2


def test_map_in_order_keeps_the_input_order_under_uneven_work(two_threads):
    import time

    from mimar.evaluation.features import _map_in_order

    def work(i: int) -> tuple[int, int]:
        time.sleep(0.002 * (i % 3))  # later items often finish first
        return i, torch.get_num_threads()

    out = list(_map_in_order(work, range(20), workers=2))
    assert [i for i, _ in out] == list(range(20))
    assert {threads for _, threads in out} == {1}  # one intra-op thread per worker
    assert torch.get_num_threads() == 2


# ------------------------------------------------------------------------------------------ kNN


def _unit(degrees: float, norm: float = 1.0) -> list[float]:
    rad = math.radians(degrees)
    return [norm * math.cos(rad), norm * math.sin(rad)]


# Class B (=1) sits at 0 deg, class A (=0) at +-60 deg and 180 deg. Norms differ on purpose:
# the vote must use cosine similarity only.
TOY_TRAIN = torch.tensor([_unit(0, 3.0), _unit(60, 0.5), _unit(-60, 2.0), _unit(180, 7.0)])
TOY_LABELS = torch.tensor([1, 0, 0, 0])
# Query at 0 deg: its 3 neighbours are B (cos 1) and A, A (cos 0.5 each).
# Query at 180 deg: its 3 neighbours are A (cos 1), A, A (cos -0.5); always A.
TOY_TEST = torch.tensor([_unit(0), _unit(180, 4.0)])
TOY_TEST_LABELS = torch.tensor([1, 0])


def _hand_vote_first_query(temperature: float) -> int:
    vote_b = math.exp(1.0 / temperature)
    vote_a = 2 * math.exp(0.5 / temperature)
    return 1 if vote_b > vote_a else 0


@pytest.mark.parametrize(
    ("temperature", "expected"),
    [
        (0.07, 1),  # DINO temperature: the single very close B outweighs two As
        (0.7, 1),  # just below the crossover T* = 0.5 / ln 2 ~ 0.721
        (0.75, 0),  # just above it
        (1e6, 0),  # weights ~ 1: plain majority vote, 2 As beat 1 B
    ],
)
def test_knn_weighted_vote_matches_hand_computation(temperature, expected):
    assert _hand_vote_first_query(temperature) == expected
    preds = knn_predict(TOY_TRAIN, TOY_LABELS, TOY_TEST, k=3, temperature=temperature)
    assert preds.tolist() == [expected, 0]
    result = knn_classify(
        TOY_TRAIN, TOY_LABELS, TOY_TEST, TOY_TEST_LABELS, k=3, temperature=temperature
    )
    assert result["top1"] == (100.0 if expected == 1 else 50.0)
    assert result | {"top1": 0} == {
        "top1": 0,
        "k": 3,
        "temperature": temperature,
        "n_train": 4,
        "n_test": 2,
    }


def test_knn_k_larger_than_train_and_chunking_agree():
    gen = torch.Generator().manual_seed(0)
    train, test = torch.randn(50, 8, generator=gen), torch.randn(37, 8, generator=gen)
    labels = torch.randint(0, 5, (50,), generator=gen)
    full = knn_predict(train, labels, test, k=7, chunk_size=1024)
    assert torch.equal(knn_predict(train, labels, test, k=7, chunk_size=4), full)
    # k capped at n_train: every query sees all 4 toy points
    preds = knn_predict(TOY_TRAIN, TOY_LABELS, TOY_TEST, k=100, temperature=1e6)
    assert preds.tolist() == [0, 0]  # 3 As vs 1 B for both queries


@pytest.mark.parametrize(("n_train", "k"), [(5000, 20), (4097, 1), (2561, 7)])
def test_knn_group_topk_finds_the_plain_topk(n_train, k):
    """The group-maxima search returns the k largest similarities and rows holding them,
    with a partial last group (padding at -inf) and with duplicated train rows (ties)."""
    gen = torch.Generator().manual_seed(n_train)
    train = F.normalize(torch.randn(n_train, 16, generator=gen), dim=1)
    train[1::3] = train[::3][: len(train[1::3])]  # many exact ties
    test = F.normalize(torch.randn(300, 16, generator=gen), dim=1)
    groups = _Groups(train, k)
    assert groups.pad is not None  # the grouped path runs
    values, rows = groups.topk(test)
    sim = test @ train.T
    assert torch.equal(values, sim.topk(k, dim=1).values)
    assert (rows < n_train).all() and torch.equal(sim.gather(1, rows), values)


def test_knn_separable_clusters_is_perfect():
    gen = torch.Generator().manual_seed(0)
    centers = 10 * torch.randn(5, 32, generator=gen)
    train_labels = torch.arange(5).repeat_interleave(40)
    test_labels = torch.arange(5).repeat_interleave(20)
    train = centers[train_labels] + 0.5 * torch.randn(200, 32, generator=gen)
    test = centers[test_labels] + 0.5 * torch.randn(100, 32, generator=gen)
    result = knn_classify(train, train_labels, test, test_labels, k=20, chunk_size=16)
    assert result["top1"] == 100.0
    assert (result["n_train"], result["n_test"]) == (200, 100)


# ------------------------------------------------------------------------------- linear probe


def _clusters(n_per_class: int, gen: torch.Generator, centers: torch.Tensor):
    labels = torch.arange(len(centers)).repeat_interleave(n_per_class)
    feats = centers[labels] + torch.randn(len(labels), centers.shape[1], generator=gen)
    return feats, labels


def test_linear_probe_separable_data():
    gen = torch.Generator().manual_seed(0)
    centers = 4 * torch.randn(4, 16, generator=gen) + 3.0  # offset: standardisation matters
    train_feats, train_labels = _clusters(200, gen, centers)
    test_feats, test_labels = _clusters(100, gen, centers)
    result = linear_probe(
        train_feats, train_labels, test_feats, test_labels, epochs=10, batch_size=64
    )
    assert result["top1"] >= 99.0
    assert result["best_lr"] in (1e-3, 3e-3, 1e-2, 3e-2)
    assert set(result["val_top1"]) == {1e-3, 3e-3, 1e-2, 3e-2}
    assert result["val_top1"][result["best_lr"]] == max(result["val_top1"].values())
    assert result["epochs"] == 10


def test_linear_probe_random_labels_is_near_chance_and_ignores_test_labels():
    gen = torch.Generator().manual_seed(1)
    train_feats, test_feats = torch.randn(2000, 16, generator=gen), torch.randn(2000, 16)
    train_labels = torch.randint(0, 4, (2000,), generator=gen)
    test_labels = torch.randint(0, 4, (2000,), generator=gen)
    kwargs = {"epochs": 5, "batch_size": 128, "lrs": (1e-2, 1e-1)}
    result = linear_probe(train_feats, train_labels, test_feats, test_labels, **kwargs)
    assert 18.0 < result["top1"] < 32.0  # chance is 25 %
    assert all(acc < 35.0 for acc in result["val_top1"].values())
    assert result["best_lr"] in (1e-2, 1e-1)
    # test labels never influence training or lr choice; a fixed seed repeats exactly
    shuffled = test_labels[torch.randperm(2000, generator=gen)]
    again = linear_probe(train_feats, train_labels, test_feats, shuffled, **kwargs)
    assert again["val_top1"] == result["val_top1"] and again["best_lr"] == result["best_lr"]
    same = linear_probe(train_feats, train_labels, test_feats, test_labels, **kwargs)
    assert same == result


def test_linear_heads_get_their_own_learning_rate():
    # From zero init, AdamW moves each weight by ~lr per step, so with tiny lrs (gradients
    # barely change) the head weight norms scale with their lr: 100x apart here.
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(256, 16, generator=gen), torch.randint(0, 3, (256,), generator=gen)
    weight, bias = _train_heads(x, y, 3, (1e-6, 1e-4), 2, 0.0, 64, gen)
    assert weight.shape == (2, 16, 3) and bias.shape == (2, 3)
    ratio = weight[1].norm() / weight[0].norm()
    assert 95.0 < ratio < 105.0


def test_linear_probe_adamw_by_hand_is_torch_adamw_per_head():
    """Each head (dim 1) of the hand-written update follows torch.optim.AdamW with that head's
    lr, and each row (dim 0) its own decay (decoupled, bias corrections), step for step."""
    from mimar.evaluation.linear import _AdamW

    gen = torch.Generator().manual_seed(0)
    lrs, wd = (1e-2, 3e-1), 0.05
    start = torch.randn(5, 2, 3, generator=gen)  # (D + 1, R, C): the last row is the bias
    grads = [torch.randn(5, 2, 3, generator=gen) for _ in range(6)]
    decay = torch.tensor([wd] * 4 + [0.0]).view(5, 1, 1)
    ours = _AdamW(start.clone(), decay)
    heads = [start[:, r].clone().requires_grad_(True) for r in range(2)]
    torch_opts = []
    for head, lr in zip(heads, lrs):
        groups = [{"params": [head], "weight_decay": wd}]
        torch_opts.append(torch.optim.AdamW(groups, lr=lr))
    for step, grad in enumerate(grads, start=1):
        scale = 0.5 ** (step - 1)  # a changing schedule factor, as the cosine
        ours.update(grad, torch.tensor(lrs).view(1, 2, 1) * scale, step)
        for r, (head, opt) in enumerate(zip(heads, torch_opts)):
            opt.param_groups[0]["lr"] = lrs[r] * scale
            before = head.detach()[4].clone()
            head.grad = grad[:, r].clone()
            opt.step()
            with torch.no_grad():  # the bias row: the same step without decay
                head[4] = before - (before - head[4]) + lrs[r] * scale * wd * before
    for r, head in enumerate(heads):
        torch.testing.assert_close(ours.param[:, r], head.detach(), rtol=1e-6, atol=1e-7)


def test_linear_probe_step_follows_the_autograd_gradient_of_the_summed_cross_entropies():
    """One step from zero: AdamW moves every weight by lr * g / (|g| + eps), with g the
    autograd gradient of sum over heads of each head's mean cross-entropy."""
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 6, generator=gen), torch.randint(0, 4, (40,), generator=gen)
    lrs = (1e-3, 1e-2)
    weight, bias = _train_heads(x, y, 4, lrs, 1, 0.0, 64, torch.Generator().manual_seed(1))
    w = torch.zeros(6, 4, requires_grad=True)
    b = torch.zeros(4, requires_grad=True)
    F.cross_entropy(x @ w + b, y).backward()  # each head sees the same loss from zero
    for r, lr in enumerate(lrs):
        for ours, grad in ((weight[r], w.grad), (bias[r], b.grad)):
            clear = grad.abs() > 1e-4  # near-zero gradients: the ratio is rounding noise
            assert clear.sum() >= 0.75 * grad.numel()
            expected = -lr * grad / (grad.abs() + 1e-8)
            torch.testing.assert_close(ours[clear], expected[clear])


def test_linear_probe_rejects_bad_arguments():
    x, y = torch.randn(10, 4), torch.zeros(10, dtype=torch.long)
    with pytest.raises(ValueError):
        linear_probe(x, y, x, y, val_fraction=0.0)
    with pytest.raises(ValueError):
        linear_probe(x, y, x, y, lrs=())
    with pytest.raises(ValueError):
        linear_probe(x, y[:5], x, y)


# ------------------------------------------------------------------------------------ reporting


def test_results_table_and_print(capsys):
    rows = [
        {"model": "vit_tiny", "protocol": "knn", "layer": -1, "top-1": 71.234},
        {"model": "vit_tiny", "protocol": "linear", "top1": 80.5, "notes": "lr 0.01"},
    ]
    table = results_table(rows, "IN-1k")
    assert [column.header for column in table.columns] == [
        "model",
        "protocol",
        "layer",
        "top-1",
        "notes",
    ]
    assert table.row_count == 2
    assert list(table.columns[3].cells) == ["71.23", "80.50"]
    assert list(table.columns[2].cells) == ["-1", ""]  # missing -> ""
    assert list(table.columns[4].cells) == ["", "lr 0.01"]
    print_results(rows, "IN-1k")
    out = capsys.readouterr().out
    assert "IN-1k" in out and "71.23" in out and "lr 0.01" in out
    console = Console(record=True, width=100)
    print_results([], "empty", console=console)
    assert "top-1" in console.export_text()


def test_write_json_is_atomic_and_round_trips(tmp_path):
    path = tmp_path / "runs" / "eval" / "results.json"  # parents are created
    payload = {"top1": 71.5, "val_top1": {"0.001": 70.0}, "feats": torch.tensor([1.0, 2.0])}
    write_json(path, payload)
    assert json.loads(path.read_text()) == payload | {"feats": [1.0, 2.0]}
    write_json(path, {"top1": 72.0})  # overwrite
    assert json.loads(path.read_text()) == {"top1": 72.0}
    with pytest.raises(TypeError):
        write_json(path, {"bad": object()})
    assert json.loads(path.read_text()) == {"top1": 72.0}  # old content intact
    assert [p.name for p in path.parent.iterdir()] == ["results.json"]  # no temp files left


def test_write_json_and_checkpoints_share_the_atomic_writer(tmp_path):
    path = tmp_path / "state.pt"
    save_atomic({"w": torch.ones(2)}, path)
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.ones(2))
    write_json(tmp_path / "r.json", {"a": 1})
    assert (path.stat().st_mode & 0o777) == ((tmp_path / "r.json").stat().st_mode & 0o777) == 0o644

    def half_written(f):
        f.write(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(path, half_written)
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.ones(2))  # old file intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "state.pt"]


# ----------------------------------------------------------------------------- training loop


def test_fit_follows_the_cosine_per_group_and_epoch_order():
    gen = torch.Generator().manual_seed(0)
    w, b = torch.zeros(3, requires_grad=True), torch.zeros(1, requires_grad=True)
    groups = [{"params": [w], "lr": 0.1}, {"params": [b]}]  # the second one takes fit's lr
    seen = []

    def step_loss(idx):
        seen.append((idx.tolist(), groups[0]["lr"], groups[1]["lr"]))
        return (w.sum() + b.sum()) ** 2

    fit(step_loss, groups, 10, epochs=2, batch_size=4, generator=gen, lr=0.01)
    total = 2 * 3  # ceil(10 / 4) = 3 steps an epoch
    for step, (_, lr_w, lr_b) in enumerate(seen):
        factor = 0.5 * (1 + math.cos(math.pi * step / total))  # 1 at the first step, no warmup
        assert (lr_w, lr_b) == pytest.approx((0.1 * factor, 0.01 * factor))
    again = torch.Generator().manual_seed(0)
    epochs = [torch.randperm(10, generator=again).split(4) for _ in range(2)]
    assert [i for i, _, _ in seen] == [b.tolist() for e in epochs for b in e]  # sizes 4, 4, 2


def test_fit_warmup_mode_and_epoch_losses():
    gen = torch.Generator().manual_seed(0)
    model = nn.Linear(2, 1)
    model.eval()
    lrs, modes = [], []

    def step_loss(idx):
        lrs.append(optimizer_groups[0]["lr"])
        modes.append(model.training)
        return torch.tensor(float(len(idx)), requires_grad=True)  # loss = batch size

    optimizer_groups = [{"params": list(model.parameters())}]
    losses = fit(
        step_loss, optimizer_groups, 6, epochs=2, batch_size=4, generator=gen, lr=1.0,
        warmup_steps=2, module=model,
    )  # fmt: skip
    # 4 steps: linear warm-up over 2 (lr_at: (step + 1) / 2), then the cosine over the other 2
    assert lrs == pytest.approx([0.5, 1.0, 1.0, 0.5])
    assert modes == [True] * 4 and model.training is False
    assert losses == [3.0, 3.0]  # (4 + 2) / 2 per epoch


def test_fit_equals_the_plain_adamw_cosine_loop_bitwise():
    """The loop each probe had before fit(): AdamW, LambdaLR cosine, randperm minibatches."""
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(50, 6, generator=gen), torch.randint(0, 3, (50,), generator=gen)

    def make():
        torch.manual_seed(0)
        return nn.Linear(6, 3)

    ref = make()
    optimizer = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.05)
    total = 3 * math.ceil(50 / 16)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.5 * (1.0 + math.cos(math.pi * s / total))
    )
    order = torch.Generator().manual_seed(1)
    for _ in range(3):
        for idx in torch.randperm(50, generator=order).split(16):
            loss = F.cross_entropy(ref(x[idx]), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()

    model = make()
    groups = [{"params": list(model.parameters()), "weight_decay": 0.05}]
    fit(
        lambda idx: F.cross_entropy(model(x[idx]), y[idx]), groups, 50, epochs=3,
        batch_size=16, generator=torch.Generator().manual_seed(1), lr=1e-2,
    )  # fmt: skip
    assert torch.equal(model.weight, ref.weight) and torch.equal(model.bias, ref.bias)


# ------------------------------------------------------------------------ config and protocols


def test_each_protocol_checks_its_own_options():
    made = request(["knn", "attentive"], checkpoint="run", blocks=[0, 1], k=5)
    assert made.protocols == ("knn", "attentive") and made.options["attentive"].blocks == (0, 1)
    assert made.options["knn"].k == 5 and made.run.checkpoint == "run"
    assert (made.run.device, made.options["knn"].attention, made.options["knn"].layer) == (
        "auto",
        "bidirectional",
        None,
    )
    bad = [
        ((), {}, "protocols must be among"),
        (("knn", "svm"), {}, "protocols must be among"),
        (("knn", "knn"), {}, "distinct"),
        (("knn",), {"layer": "last"}, "layer"),
        (("linear",), {"layer": True}, "layer"),
        (("knn",), {"pool": "max"}, "pool"),
        (("lora",), {"attention": "sparse"}, "attention"),
        (("attentive",), {"blocks": ()}, "blocks"),
        (("knn",), {"max_train": -1}, "max_train"),
        (("finetune",), {"batch_size": 0}, "batch_size"),
        (("knn",), {"k": 0}, "k must"),
        (("lora",), {"lora_rank": 0}, "lora_rank"),
        (("linear",), {"epochs": 0}, "epochs"),
        (("knn",), {"device": "gpu0"}, "device"),
        (("segment",), {"neck": "fresh"}, "neck"),
        (("knn",), {"no_such_option": 1}, "unknown evaluation option"),
        (("knn",), {"k": 50, "max_train": 20}, "lower --k"),
    ]
    for protocols, change, message in bad:
        with pytest.raises(ValueError, match=message):
            request(protocols, **({"checkpoint": "run"} | change))
    request(["linear"], checkpoint="run", k=50, max_train=20)  # no kNN: k is not read


def test_options_no_requested_protocol_reads_are_ignored_with_a_warning(caplog):
    """As before the options were declared per protocol: `eval knn --epochs 5` still runs."""
    made = request(["knn"], checkpoint="run", epochs=5, lora_rank=4)
    assert set(made.options) == {"knn"}
    assert "epochs" in caplog.text and "lora_rank" in caplog.text
    request(["knn"], checkpoint="run", epochs=None, lora_rank=8)  # defaults: no warning
    assert len(caplog.records) == 2


def test_overrides_go_to_the_protocols_that_declare_them():
    from mimar.protocols import overrides_of

    both = request(["finetune", "segment"], ["finetune.epochs=1", "dense.epochs=2"], checkpoint="r")
    assert overrides_of(both, "finetune") == ("finetune.epochs=1",)
    assert overrides_of(both, "segment") == ("dense.epochs=2",)
    dense = request(["segment", "detect"], ["dense.epochs=2", "data.x=1"], checkpoint="r")
    assert overrides_of(dense, "detect") == ("dense.epochs=2", "data.x=1")  # one recipe kind
    with pytest.raises(ValueError, match=r"apply to the finetune, segment, detect protocols"):
        request(["knn"], ["finetune.epochs=1"], checkpoint="r")
    with pytest.raises(ValueError, match=r"start with none of"):
        request(["finetune", "detect"], ["foo.x=1"], checkpoint="r")


def test_every_shared_option_is_declared_alike():
    """A field several protocols declare is one flag: same type, default and help."""
    import dataclasses

    from mimar.protocols import option_classes

    seen = {}
    for cls in option_classes():
        for f in dataclasses.fields(cls):
            spec = (f.type, f.default, f.metadata.get("help"), f.metadata.get("flag"))
            assert seen.setdefault(f.name, spec) == spec, f.name


def test_protocol_table_drives_names_epochs_and_pixel_rows():
    names = ("knn", "linear", "attentive", "lora", "finetune", "robustness", "segment", "detect")
    assert PROTOCOLS == tuple(PROTOCOL_TABLE) == names
    # finetune's and the dense tasks' epochs come from their recipes (finetune.epochs,
    # dense.epochs), robustness trains nothing
    alone = [None] * 4
    assert [PROTOCOL_TABLE[p].epochs(None) for p in PROTOCOLS] == [None, 30, 10, 3, *alone]
    assert [PROTOCOL_TABLE[p].epochs(2) for p in PROTOCOLS] == [None, 2, 2, 2, *alone]
    assert [PROTOCOL_TABLE[p].pixel_row for p in PROTOCOLS] == [True, True] + [False] * 6
