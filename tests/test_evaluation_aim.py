"""AIM-style evaluation: attentive probe, LoRA, per-layer probes and causal attention."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import DEMO, TINY
from torch import nn

from mimar.backbones.vit import ViT, ViTConfig
from mimar.cli import main
from mimar.data.config import DataConfig
from mimar.data.synthetic import make_synthetic
from mimar.evaluation import (
    AttentiveClassifier,
    AttentivePooler,
    add_lora,
    attentive_params,
    attentive_probe,
    causal_mask,
    extract_block_tokens,
    extract_features,
    extract_layer_features,
    knn_classify,
    lora_finetune,
    lora_targets,
    merge_lora,
    save_adapter,
)
from mimar.evaluation.frozen import frozen_request
from mimar.evaluation.runner import build_setup, run_source
from mimar.loading import load_backbone, load_run
from mimar.masking import patch_order

D = 32


def _vit(class_token: bool = True) -> ViT:
    torch.manual_seed(0)
    cfg = ViTConfig(
        img_size=16, patch_size=4, in_chans=1, embed_dim=D, depth=2, num_heads=2,
        class_token=class_token,
    )  # fmt: skip
    return ViT(cfg).eval()


def _images(n: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 1, 16, 16, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------ attentive probe


@pytest.mark.parametrize("bias", [True, False])
def test_attentive_parameter_count_is_the_formula(bias):
    model = AttentiveClassifier(D, num_classes=10, num_heads=4, classifier_bias=bias)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == attentive_params(D, 10, bias) == 2 * D * D + D + D * 10 + 10 * bias
    assert (model.linear.bias is not None) is bias


def test_attentive_classifier_has_no_bias_by_default():
    """ml-aim's AttentionPoolingClassifier defaults to linear_bias=False (docs/METHODS.md §5.6)."""
    model = AttentiveClassifier(D, num_classes=10, num_heads=4)
    assert model.linear.bias is None
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == attentive_params(D, 10) == 2 * D * D + D + D * 10
    assert list(model.pooler.norm.parameters()) == []  # affine-free BatchNorm
    assert {n for n, _ in model.pooler.norm.named_buffers()} >= {"running_mean", "running_var"}


def test_attentive_pooler_matches_the_ml_aim_maths():
    """ml-aim v1 AttentionPoolingClassifier.forward, transcribed (q = cls_token * scale)."""
    torch.manual_seed(0)
    pooler = AttentivePooler(D, num_heads=4).eval()
    pooler.norm.running_mean.normal_()
    pooler.norm.running_var.uniform_(0.5, 2.0)
    x = torch.randn(3, 7, D)
    B, N, C, H = 3, 7, D, 4
    xn = (x - pooler.norm.running_mean) / torch.sqrt(pooler.norm.running_var + 1e-6)
    q = pooler.query.expand(B, -1, -1).reshape(B, 1, H, C // H).permute(0, 2, 1, 3)
    k = pooler.k(xn).reshape(B, N, H, C // H).permute(0, 2, 1, 3)
    v = pooler.v(xn).reshape(B, N, H, C // H).permute(0, 2, 1, 3)
    attn = ((q * (C // H) ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
    expected = (attn @ v).transpose(1, 2).reshape(B, 1, C).mean(dim=1)
    with torch.no_grad():
        torch.testing.assert_close(pooler(x), expected, atol=1e-5, rtol=1e-5)


def test_attentive_batchnorm_learns_running_stats_and_uses_them_in_eval():
    pooler = AttentivePooler(D, num_heads=4)
    x = 3.0 + 2.0 * torch.randn(64, 5, D, generator=torch.Generator().manual_seed(0))
    pooler.train()
    for _ in range(200):  # momentum 0.1: the running stats converge to the data's (0.9^200)
        pooler(x)
    torch.testing.assert_close(pooler.norm.running_mean, x.reshape(-1, D).mean(0))
    pooler.eval()
    with torch.no_grad():  # eval: one sample's output does not depend on its batch mates
        torch.testing.assert_close(pooler(x)[:1], pooler(x[:1]), atol=1e-6, rtol=1e-6)
        before = pooler.norm.running_mean.clone()
        pooler(x + 5)
    assert torch.equal(pooler.norm.running_mean, before)


def _token_task(n: int, seed: int, directions: torch.Tensor):
    """T=8 noise tokens; one random position carries 5x its class's unit direction."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % len(directions)
    tokens = torch.randn(n, 8, D, generator=gen)
    where = torch.randint(0, 8, (n,), generator=gen)
    tokens[torch.arange(n), where] += 5.0 * directions[labels]
    return tokens.to(torch.bfloat16), labels


def test_attentive_probe_learns_a_separable_token_task():
    directions = F.normalize(torch.randn(4, D, generator=torch.Generator().manual_seed(9)), dim=1)
    train_tokens, train_labels = _token_task(512, 1, directions)
    test_tokens, test_labels = _token_task(256, 2, directions)
    result = attentive_probe(
        train_tokens, train_labels, test_tokens, test_labels,
        num_heads=4, epochs=20, lr=1e-2, batch_size=64, seed=0,
    )  # fmt: skip
    assert result["top1"] > 90.0
    assert result["params"] == attentive_params(D, 4)
    again = attentive_probe(
        train_tokens, train_labels, test_tokens, test_labels,
        num_heads=4, epochs=20, lr=1e-2, batch_size=64, seed=0,
    )  # fmt: skip
    assert again["top1"] == result["top1"]  # seeded: init and minibatch order


# ------------------------------------------------------------------------------------------ LoRA


def _adapter_pairs(model: nn.Module):
    """peft's (A, B) weight pairs of every adapted linear, with its scaling."""
    for module in model.modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            yield module.lora_A["default"].weight, module.lora_B["default"].weight, module


def test_add_lora_starts_identical_and_merges_back_to_the_same_outputs():
    base, adapted = _vit(), _vit()
    peft_model = add_lora(adapted, rank=4, alpha=8.0)
    names = [f"blocks.{i}.attn.{n}" for i in range(2) for n in ("qkv", "proj")]
    assert lora_targets(base, ("attn.qkv", "attn.proj")) == names
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(adapted(x)["tokens"], base(x)["tokens"])  # B = 0
        pairs = list(_adapter_pairs(adapted))
        assert len(pairs) == 4
        for a, b, module in pairs:
            assert a.shape[0] == 4 and b.shape[1] == 4 and module.scaling["default"] == 2.0
            b.normal_(std=0.1)
        lora_out = adapted(x)["tokens"]
        qkv = adapted.blocks[0].attn.qkv  # W + (alpha / r) B A, by hand, for one layer
        a, b = qkv.lora_A["default"].weight, qkv.lora_B["default"].weight
        want = base.blocks[0].attn.qkv.weight + 2.0 * b @ a
        merged = merge_lora(copy.deepcopy(peft_model))
        torch.testing.assert_close(merged.blocks[0].attn.qkv.weight, want)
        torch.testing.assert_close(merged(x)["tokens"], lora_out, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(lora_out, base(x)["tokens"])
    assert all(type(merged.get_submodule(n)) is nn.Linear for n in names)
    assert merged.state_dict().keys() == base.state_dict().keys()  # timm names again


def test_lora_adapter_saves_in_peft_format_and_loads_back(tmp_path):
    from peft import PeftModel

    adapted = _vit()
    peft_model = add_lora(adapted, rank=4, alpha=8.0)
    with torch.no_grad():
        for _, b, _ in _adapter_pairs(adapted):
            b.normal_(std=0.1)
    x = _images()
    want = adapted(x)["tokens"]
    folder = save_adapter(peft_model, tmp_path / "adapter")
    assert {p.name for p in folder.iterdir()} >= {
        "adapter_config.json",
        "adapter_model.safetensors",
    }
    loaded = PeftModel.from_pretrained(_vit(), str(folder))
    torch.testing.assert_close(loaded(x)["tokens"], want)


def test_lora_only_adapters_and_head_get_gradients():
    vit = _vit()
    add_lora(vit, rank=4)
    head = nn.Linear(D, 3)
    logits = head(vit(_images())["tokens"][:, 1:].mean(1))
    F.cross_entropy(logits, torch.tensor([0, 1, 2, 0, 1, 2])).backward()
    for name, p in vit.named_parameters():
        is_adapter = ".lora_A." in name or ".lora_B." in name
        assert p.requires_grad is is_adapter, name
        assert (p.grad is not None) is is_adapter, name
    assert all(p.grad is not None for p in head.parameters())
    adapters = sum(p.numel() for p in vit.parameters() if p.requires_grad)
    assert adapters == 2 * (4 * (D + 3 * D) + 4 * (D + D))  # depth x (qkv + proj), r (in + out)


def test_lora_finetune_reports_parameters_and_learns():
    cfg = DataConfig(name="synthetic", img_size=16, in_chans=1, synthetic_size=128)
    train, test = make_synthetic(cfg, "train"), make_synthetic(cfg, "test")
    vit = _vit()
    total_before = sum(p.numel() for p in vit.parameters())
    result = lora_finetune(
        vit, train, test, img_size=16, rank=4, epochs=4, lr=3e-3, batch_size=32, seed=0
    )
    adapters = 2 * 4 * (4 * D + 2 * D)
    assert result["adapter_params"] == adapters
    assert result["trainable_params"] == adapters + D * 4 + 4  # + head (4 classes)
    assert result["total_params"] == total_before + adapters + D * 4 + 4
    assert result["top1"] > 50.0  # 4 classes: chance is 25 %


# ---------------------------------------------------------------------- layer taps and causality


def test_layer_features_come_from_one_forward_and_match_single_taps():
    vit, x = _vit(), _images()
    batches = [(x[:4], None), (x[4:], None)]
    calls = []
    vit.register_forward_hook(lambda *_: calls.append(1))
    feats, _ = extract_layer_features(vit, batches, layers=(0, 1, None))
    assert [f.shape for f in feats] == [(6, D)] * 3 and len(calls) == 2  # one forward a batch
    for i, layer in enumerate((0, 1, None)):
        torch.testing.assert_close(feats[i], extract_features(vit, batches, layer=layer)[0])


def test_block_tokens_average_raw_blocks_without_prefix():
    vit, x = _vit(), _images()
    tokens, _ = extract_block_tokens(vit, [(x, None)], blocks=(0, 1))
    with torch.no_grad():
        layers = vit(x, return_layers=(0, 1))["layers"]
    expected = (layers[0][:, 1:] + layers[1][:, 1:]) / 2  # (B, 16, D), class token dropped
    assert tokens.dtype == torch.bfloat16 and tokens.shape == (6, 16, D)
    torch.testing.assert_close(tokens.float(), expected, atol=2e-2, rtol=1e-2)


def test_causal_attention_changes_features():
    vit, x = _vit(), _images()
    mask = causal_mask(1 + 16)
    assert mask.dtype == torch.bool and mask[0, 1].item() is False and mask[16, 0].item() is True
    full, _ = extract_features(vit, [(x, None)])
    causal, _ = extract_features(vit, [(x, None)], attn_mask=mask)
    everything, _ = extract_features(vit, [(x, None)], attn_mask=torch.ones(17, 17, dtype=bool))
    assert not torch.allclose(full, causal, atol=1e-3)
    torch.testing.assert_close(everything, full)
    with torch.no_grad():  # causal: the first patch token sees the class token and itself only
        tokens = vit(x, attn_mask=mask)["tokens"]
        alone = vit(x, attn_mask=mask & (torch.arange(17) < 2))["tokens"]
    torch.testing.assert_close(tokens[:, :2], alone[:, :2])


# ------------------------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("aim_eval") / "run"
    assert main(["pretrain", DEMO, *TINY, "train.steps=6", "--run-dir", str(run_dir)]) == 0
    return run_dir


def test_eval_layer_all_writes_every_block_and_the_best(run, capsys):
    args = ["eval", "knn", "linear", "--checkpoint", str(run), "--layer", "all", "--epochs", "2"]
    assert main([*args, "--baselines"]) == 0
    assert "best" in capsys.readouterr().out
    for protocol in ("knn", "linear"):
        result = json.loads((run / "eval" / f"{protocol}.json").read_text())
        assert result["layer"] == "all"
        rows = result["rows"]
        assert [(r["model"], r["block"]) for r in rows] == [
            ("raw pixels", None), ("random init", 0), ("random init", 1),
            ("pretrained", 0), ("pretrained", 1),
        ]  # fmt: skip
        pretrained = [r for r in rows if r["model"] == "pretrained"]
        best = max(pretrained, key=lambda r: r["top1"])
        assert result["best_layer"] == best["block"] and best["best"]
        assert sum(r["best"] for r in pretrained) == 1
        assert sum(r["best"] for r in rows if r["model"] == "random init") == 1


def test_eval_attentive_and_lora_skip_pixels_and_report_parameters(run, capsys):
    args = ["eval", "attentive", "lora", "--checkpoint", str(run), "--baselines"]
    args += ["--epochs", "1", "--blocks", "0,1", "--lora-rank", "2", "--attention", "causal"]
    assert main([*args, "--max-train", "64", "--max-test", "32"]) == 0
    assert "trainable" in capsys.readouterr().out
    attentive = json.loads((run / "eval" / "attentive.json").read_text())
    assert attentive["attention"] == "causal" and attentive["epochs"] == 1
    assert [r["model"] for r in attentive["rows"]] == ["random init", "pretrained"]
    for row in attentive["rows"]:
        assert row["blocks"] == [0, 1] and row["details"]["params"] == attentive_params(32, 4)
    lora = json.loads((run / "eval" / "lora.json").read_text())
    assert [r["model"] for r in lora["rows"]] == ["random init", "pretrained"]
    adapters = 2 * 2 * (4 * 32 + 2 * 32)  # depth 2, rank 2
    assert all(r["details"]["adapter_params"] == adapters for r in lora["rows"])
    for model in ("random-init", "pretrained"):  # each adapter in peft's format
        assert (run / "eval" / "lora-adapter" / model / "adapter_model.safetensors").is_file()
    for result in (attentive, lora):  # top-1 is a percentage of the 32 test images kept
        assert result["n_test"] == 32
        for row in result["rows"]:
            correct = row["top1"] * 32 / 100
            assert correct == pytest.approx(round(correct), abs=1e-4) and row["top1"] > 0
            assert row["details"]["top1"] == row["top1"]


def test_eval_probe_bias_flag_and_device(run):
    args = ["eval", "attentive", "--checkpoint", str(run), "--epochs", "1", "--device", "cpu"]
    assert main([*args, "--probe-bias", "--max-train", "32", "--max-test", "16"]) == 0
    attentive = json.loads((run / "eval" / "attentive.json").read_text())
    params = attentive["rows"][0]["details"]["params"]
    assert params == attentive_params(32, 4, classifier_bias=True) == 2 * 32 * 32 + 32 + 32 * 4 + 4


def test_eval_reports_bad_settings_in_one_line(run, capsys):
    assert main(["eval", "knn", "--checkpoint", str(run), "--device", "gpu0"]) == 2
    assert main(["eval", "knn", "knn", "--checkpoint", str(run)]) == 2
    assert main(["eval", "knn", "--checkpoint", str(run), "--batch-size", "0"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3 and all(line.startswith("mimar eval: error: ") for line in err)
    assert "device" in err[0] and "distinct" in err[1] and "batch_size" in err[2]


@pytest.mark.parametrize("protocol", ["attentive", "lora"])
def test_eval_help_exits_zero(protocol, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", protocol, "--help"])
    assert exit_info.value.code == 0
    assert "--lora-rank" in capsys.readouterr().out


def test_eval_rejects_a_bad_layer_and_bad_blocks(run):
    for bad in (["--layer", "last"], ["--blocks", "1,x"]):
        with pytest.raises(SystemExit) as exit_info:
            main(["eval", "knn", "--checkpoint", str(run), *bad])
        assert exit_info.value.code == 2


def test_causal_mask_is_lower_triangular():
    mask = causal_mask(5)
    assert torch.equal(mask, torch.tril(torch.ones(5, 5)).bool())
    assert mask.sum().item() == 15 == math.comb(6, 2)


def test_causal_mask_follows_a_hand_made_order():
    # 2x2 grid read in spiral order: raster ids 0, 1, 3, 2 (top row, then down the right side).
    order = patch_order("spiral", 2)
    assert order.tolist() == [0, 1, 3, 2]
    expected = torch.tensor(
        [
            [1, 0, 0, 0],  # patch 0, read 1st: itself
            [1, 1, 0, 0],  # patch 1, read 2nd
            [1, 1, 1, 1],  # patch 2, read last: everything
            [1, 1, 0, 1],  # patch 3, read 3rd: not patch 2
        ],
        dtype=torch.bool,
    )
    assert torch.equal(causal_mask(4, order), expected)
    with_cls = causal_mask(5, order)  # one prefix token: seen by all, sees itself only
    assert torch.equal(with_cls[1:, 1:], expected)
    assert with_cls[:, 0].all() and with_cls[0].tolist() == [True, False, False, False, False]
    for n in (4, 5):  # the raster order gives the lower-triangular mask
        assert torch.equal(causal_mask(n, patch_order("raster", 2)), causal_mask(n))
    with pytest.raises(ValueError, match="permutation"):
        causal_mask(4, torch.tensor([0, 1, 1, 2]))


AIM_TINY = [
    "data.name=synthetic", "data.synthetic_size=64", "data.batch_size=16", "data.img_size=16",
    "backbone.img_size=16", "backbone.embed_dim=32", "backbone.depth=2", "backbone.num_heads=2",
    "method.head_width=32", "method.head_depth=1", "train.precision=fp32",
    "train.progress=false", "train.threads=1", "train.steps=2",
]  # fmt: skip


def test_causal_eval_of_a_spiral_aim_run_reads_patches_in_spiral_order(tmp_path):
    run = tmp_path / "aim"
    argv = ["pretrain", "configs/aim/vit_tiny_fmnist.yaml", *AIM_TINY, "method.order=spiral"]
    assert main([*argv, "--run-dir", str(run)]) == 0
    evaluation = ["eval", "knn", "--checkpoint", str(run), "--attention", "causal"]
    assert main([*evaluation, "--device", "cpu"]) == 0
    top1 = json.loads((run / "eval" / "knn.json").read_text())["rows"][0]["top1"]

    run_cfg, _ = load_run(run)
    cfg = frozen_request(["knn"], checkpoint=run, attention="causal", device="cpu")
    setup = build_setup(run_source(run_cfg, None), cfg)
    backbone = load_backbone(run)  # 4x4 patches, no class token
    spiral = causal_mask(16, patch_order("spiral", 4))
    assert torch.equal(setup.attn_mask(backbone), spiral)
    assert not torch.equal(spiral, causal_mask(16))
    f_train, f_test = setup.extract(extract_layer_features, backbone, layers=[None])
    f_raster, _ = extract_features(backbone, setup.batches(setup.train), attn_mask=causal_mask(16))
    assert not torch.allclose(f_train[0], f_raster, atol=1e-4)  # the order matters
    by_hand = knn_classify(f_train[0], setup.train.labels, f_test[0], setup.test.labels)
    assert by_hand["top1"] == top1


def test_pooled_features_are_cached_by_content_and_reused(run, monkeypatch, capsys):
    """A second kNN of the same run reads RUN_DIR/eval/features/ instead of extracting and
    gives the same rows; another tap (or --no-feature-cache) extracts again; a damaged cache
    file is recomputed."""
    from mimar.evaluation import frozen

    cache = run / "eval" / "features"
    before = set(cache.glob("*.pt"))  # other tests of this module's run cache theirs
    args = ["eval", "knn", "--checkpoint", str(run), "--max-train", "128", "--max-test", "64"]
    assert main(args) == 0
    first = json.loads((run / "eval" / "knn.json").read_text())["rows"]
    files = sorted(set(cache.glob("*.pt")) - before)
    assert len(files) == 1

    def no_extraction(*a, **k):
        raise AssertionError("extracted although cached")

    with monkeypatch.context() as m:
        m.setattr(frozen, "extract_layer_features", no_extraction)
        assert main(args) == 0
        assert json.loads((run / "eval" / "knn.json").read_text())["rows"] == first
        with pytest.raises(AssertionError, match="extracted"):  # the cache is bypassed
            main([*args, "--no-feature-cache"])
    assert main([*args, "--layer", "0"]) == 0  # another tap, another key
    assert len(set(cache.glob("*.pt")) - before) == 2
    files[0].write_bytes(b"not a torch file")
    assert main(args) == 0  # recomputed and replaced
    assert json.loads((run / "eval" / "knn.json").read_text())["rows"] == first
    capsys.readouterr()


def test_lora_without_peft_is_one_line(monkeypatch):
    import sys

    from mimar.errors import ConfigError

    monkeypatch.setitem(sys.modules, "peft", None)  # as if not installed: import fails
    with pytest.raises(ConfigError, match=r"LoRA needs peft: pip install 'mimar\[lora\]'"):
        add_lora(_vit(), rank=2)
