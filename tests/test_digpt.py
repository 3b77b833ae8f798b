"""D-iGPT: clusters and the cluster-causal mask, generative/discriminative queries, the
2 - 2 cos loss over the listed tokens, per-cluster alignment to the teacher's grid, the
dis-decoder ablation, pixel targets, a short run, eval/export on the run, the paper recipe."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import TINY, images, loss_ends, losses, patch_teacher, perturb_patch, tiny_vit
from hypothesis import given, settings
from hypothesis import strategies as st

import mimar
from mimar import viz
from mimar.cli import main
from mimar.factory import build_backbone
from mimar.losses import cosine_distance
from mimar.masking import cluster_causal_mask, cluster_index, random_cluster_orders
from mimar.methods.digpt import DiGPT, DiGPTConfig, default_memory_layers

ROOT = Path(__file__).resolve().parents[1]
RECIPE = "configs/digpt/vit_tiny_fmnist.yaml"
DIGPT_TINY = [o for o in TINY if not o.startswith("method.")] + [
    "method.decoder_dim=32",
    "method.decoder_heads=2",
    "method.memory_layers=[1,2]",
]


# --- clusters and the mask (docs/METHODS.md §6.1-6.2) ---------------------------------------


def test_clusters_are_row_major_quadrants_with_row_major_patches():
    assert cluster_index(4, 2).tolist() == [
        [0, 1, 4, 5],
        [2, 3, 6, 7],
        [8, 9, 12, 13],
        [10, 11, 14, 15],
    ]
    quadrants = cluster_index(14, 2)  # ViT-B/16 at 224: 4 clusters of 7x7 = 49
    assert quadrants.shape == (4, 49)
    assert quadrants[3, 0].item() == 7 * 14 + 7 and quadrants[3, -1].item() == 195
    assert sorted(quadrants.flatten().tolist()) == list(range(196))


def test_a_grid_that_does_not_split_is_a_clear_error():
    with pytest.raises(
        ValueError, match=r"the 8x8 patch grid cannot be cut into 3x3.*choices: \[2, 4, 8\]"
    ):
        cluster_index(8, 3)
    with pytest.raises(ValueError, match="clusters_per_side must be >= 2"):
        DiGPTConfig(clusters_per_side=1)


def test_mask_for_4x4_patches_in_2x2_clusters_is_the_hand_written_matrix():
    # tokens: [CLS] + 3 visible clusters of 4 patches (slots 0, 1, 2); 1 = may attend
    expected = [
        "1111111111111",  # CLS attends to everything
        "0111100000000",  # slot 0: itself only, not CLS
        "0111100000000",
        "0111100000000",
        "0111100000000",
        "0111111110000",  # slot 1: slots 0-1
        "0111111110000",
        "0111111110000",
        "0111111110000",
        "1111111111111",  # slot 2 (last visible): everything, CLS included
        "1111111111111",
        "1111111111111",
        "1111111111111",
    ]
    mask = cluster_causal_mask(num_slots=3, cluster_size=4)
    assert mask.dtype == torch.bool
    assert ["".join(str(int(v)) for v in row) for row in mask.tolist()] == expected


def test_cluster_orders_are_permutations_and_reproducible():
    a = random_cluster_orders(64, 4, torch.Generator().manual_seed(0))
    b = random_cluster_orders(64, 4, torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    assert torch.equal(a.sort(1).values, torch.arange(4).expand(64, -1))
    assert len({tuple(r) for r in a.tolist()}) > 12  # many of the 24 orders appear


def test_default_memory_layers_spread_like_6_8_10_12_of_12():
    assert default_memory_layers(12) == (6, 8, 10, 12)
    assert default_memory_layers(6) == (3, 4, 5, 6)
    assert default_memory_layers(24) == (12, 16, 20, 24)
    assert default_memory_layers(2) == (1, 2)


# --- a tiny D-iGPT -----------------------------------------------------------------------


def _digpt(teacher_patch=4, **kw):
    """16 px images, patch 4 -> 4x4 grid, 2x2 clusters of 2x2 patches; depth 2. The teacher
    maps each ``teacher_patch`` patch linearly; data statistics 0 / 1, so it sees the input."""
    torch.manual_seed(0)
    vit = tiny_vit(pos_embed="sincos", weight_init="xavier", final_norm=False)
    teacher = patch_teacher(teacher_patch)
    cfg = DiGPTConfig(decoder_dim=16, decoder_heads=2, **kw)
    return DiGPT(cfg, vit, teacher).eval()


ORDER = torch.tensor([[2, 0, 3, 1]])  # read bottom-left, top-left, bottom-right, top-right


def test_generative_queries_carry_the_next_cluster_and_discriminative_the_current():
    method = _digpt()
    seen = {}
    for name in ("gen_decoder", "dis_decoder"):
        decoder = getattr(method, name)
        decoder.blocks[0].register_forward_pre_hook(
            lambda mod, args, name=name: seen.__setitem__(name, args[0].detach())
        )
    method.predict(images(1), ORDER)
    pos = method.gen_decoder.pos_embed  # (16, 16) sin-cos rows, row-major patches
    # clusters: 0 = {0,1,4,5}, 1 = {2,3,6,7}, 2 = {8,9,12,13}, 3 = {10,11,14,15}
    gen_ids = [0, 1, 4, 5] + [10, 11, 14, 15] + [2, 3, 6, 7]  # clusters 0, 3, 1 = pi(1..3)
    dis_ids = [8, 9, 12, 13] + [0, 1, 4, 5] + [10, 11, 14, 15]  # clusters 2, 0, 3 = pi(0..2)
    for name, ids in (("gen_decoder", gen_ids), ("dis_decoder", dis_ids)):
        token = getattr(method, name).query_token[0, 0]
        q = seen[name][0]  # (13, 16): class query, then 12 patch queries
        torch.testing.assert_close(q[0], token)  # the class query's position is zero
        torch.testing.assert_close(q[1:], token + pos[ids])


def test_the_encoder_sees_the_first_three_clusters_of_the_order_only():
    method = _digpt()
    x = images(1)
    base = method.predict(x, ORDER)
    hidden = perturb_patch(x, 7)  # patch 7 is in cluster 1, read last: never encoded
    for name, out in method.predict(hidden, ORDER).items():
        torch.testing.assert_close(out, base[name])


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), slot=st.integers(0, 2), member=st.integers(0, 3))
def test_perturbing_slot_k_changes_nothing_at_earlier_slots(seed, slot, member):
    method = _digpt()
    order = random_cluster_orders(1, 4, torch.Generator().manual_seed(seed))
    patch = method.clusters[order[0, slot], member].item()
    x = images(1, seed=seed % 1000)
    layers = tuple(i - 1 for i in method.memory_layers)

    def run(imgs):
        ids = method.clusters[order][:, :-1].flatten(1)
        out = method.backbone(imgs, keep_ids=ids, attn_mask=method.attn_mask, return_layers=layers)
        return out["layers"], method.predict(imgs, order)

    (enc_a, dec_a), (enc_b, dec_b) = run(x), run(perturb_patch(x, patch))
    s = method.cluster_size
    before = slice(1, 1 + slot * s)  # tokens of slots < k (after the class token)
    at_k = slice(1 + slot * s, 1 + (slot + 1) * s)
    for a, b in zip(enc_a, enc_b):
        torch.testing.assert_close(a[:, before], b[:, before], rtol=0, atol=1e-6)
        assert not torch.allclose(a[:, at_k], b[:, at_k])  # the perturbation does reach slot k
    for name in dec_a:
        torch.testing.assert_close(
            dec_a[name][:, before], dec_b[name][:, before], rtol=0, atol=1e-6
        )
    assert not torch.allclose(enc_a[-1][:, 0], enc_b[-1][:, 0])  # the class token sees all


# --- loss (docs/METHODS.md §6.6) ----------------------------------------------------------------


def test_cosine_distance_hand_computed():
    pred = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]])
    target = torch.tensor([[2.0, 0.0], [1.0, 0.0], [0.0, -1.0]])
    expected = ((2 - 2 * 1) + (2 - 2 / math.sqrt(2)) + (2 - 2 * -1)) / 3
    assert cosine_distance(pred, target).item() == pytest.approx(expected, rel=1e-6)


def _hand_loss(pred, teacher_map, teacher_cls, order, slots_of_target, resize=None):
    """2 - 2 cos by loops: for each image, each of the 3 slots i, the teacher cluster
    ``order[b, slots_of_target[i]]`` vs the prediction of slot i; plus the class token."""
    clusters = cluster_index(teacher_map.shape[-1], 2)  # teacher clusters, row-major
    D = teacher_map.shape[1]
    terms = []
    for b in range(pred.shape[0]):
        terms.append(2 - 2 * F.cosine_similarity(pred[b, 0], teacher_cls[b], dim=0))
        for i, target_slot in enumerate(slots_of_target):
            p = pred[b, 1 + 4 * i : 1 + 4 * (i + 1)]  # (4, D): the slot's 2x2 predictions
            if resize:
                grid = p.T.reshape(1, D, 2, 2)
                p = F.interpolate(grid, size=resize, mode="bilinear", align_corners=False)
                p = p.reshape(D, -1).T
            ids = clusters[order[b, target_slot]]
            t = teacher_map[b].flatten(1).T[ids]  # (s_t, D)
            for j in range(len(ids)):
                terms.append(2 - 2 * F.cosine_similarity(p[j], t[j], dim=0))
    return torch.stack(terms).mean()


@pytest.mark.parametrize("teacher_patch, resize", [(4, None), (2, (4, 4))])
def test_loss_is_2_minus_2cos_over_three_clusters_and_the_class_token(teacher_patch, resize):
    method = _digpt(teacher_patch)
    x = images(2, seed=3)
    order = torch.tensor([[2, 0, 3, 1], [1, 3, 0, 2]])
    out = method(x, order=order)
    preds = method.predict(x, order)
    with torch.no_grad():  # the toy teacher by hand: identity statistics, so its input is x
        teacher_map, teacher_cls = method.teacher.module(x)
    n_tokens = 3 * (4 if resize is None else 16) + 1  # 13 or 49 per image (193 at ViT-B/H)
    assert method.teacher_side**2 * 3 + 1 == n_tokens
    gen = _hand_loss(preds["gen"], teacher_map, teacher_cls, order, (1, 2, 3), resize)
    dis = _hand_loss(preds["dis"], teacher_map, teacher_cls, order, (0, 1, 2), resize)
    assert out["loss_gen"].item() == pytest.approx(gen.item(), rel=1e-5)
    assert out["loss_dis"].item() == pytest.approx(dis.item(), rel=1e-5)
    assert out["loss"].item() == pytest.approx(gen.item() + dis.item(), rel=1e-5)


def test_without_the_dis_decoder_only_the_generative_term_remains():
    full, gen_only = _digpt(), _digpt(dis_decoder=False)
    assert gen_only.dis_decoder is None
    assert not any("dis_decoder" in k for k in gen_only.state_dict())
    assert not any("dis_decoder" in k for k, _ in gen_only.named_parameters())
    x, order = images(2, seed=5), torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0]])
    out, ref = gen_only(x, order=order), full(x, order=order)  # same seed: same weights
    assert "loss_dis" not in out and set(gen_only.predict(x, order)) == {"gen"}
    assert out["loss"].item() == pytest.approx(ref["loss_gen"].item(), rel=1e-6)
    assert out["loss"].item() != pytest.approx(ref["loss"].item(), rel=1e-3)


def test_gradients_reach_every_trainable_parameter_and_never_the_teacher():
    method = _digpt().train()
    method(images(4, seed=7), **method.sample_corruption(4))["loss"].backward()
    for name, p in method.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, name
    frozen = {n for n, p in method.named_parameters() if not p.requires_grad}
    assert frozen == {"backbone.pos_embed"}  # the sin-cos table is fixed
    assert all(p.grad is None for p in method.teacher.module.parameters())
    assert not any(k.startswith("teacher") for k in method.state_dict())


def test_visualize_gives_rows_of_image_shape():
    method = _digpt()
    x = images(3, seed=2)
    rows = viz.reconstruction_rows(method, x, torch.Generator().manual_seed(0))
    assert "D-iGPT" in rows.pop("caption")
    assert list(rows) == ["original", "encoder input", "cosine to teacher"]
    assert all(r.shape == (3, 1, 16, 16) for r in rows.values())
    order = method.sample_corruption(3, torch.Generator().manual_seed(0))["order"]
    corner = {0: (0, 0), 1: (0, 8), 2: (8, 0), 3: (8, 8)}  # cluster -> top-left pixel (8x8)
    for b in range(3):
        for slot, shade in enumerate((0.4, 0.7, 1.0, 0.0)):  # darker = earlier; last unseen
            r, c = corner[order[b, slot].item()]
            got = rows["encoder input"][b, 0, r : r + 8, c : c + 8]
            torch.testing.assert_close(got, shade * x[b, 0, r : r + 8, c : c + 8])
        r, c = corner[order[b, 0].item()]  # the first cluster read has no prediction: black
        assert (rows["cosine to teacher"][b, 0, r : r + 8, c : c + 8] == 0).all()


def test_a_teacher_grid_that_does_not_split_is_a_clear_error():
    teacher = patch_teacher(5)  # 5 px patches on 16 px: 3x3 tokens
    with pytest.raises(ValueError, match=r"teacher's 3x3 token grid cannot be cut into 2x2"):
        DiGPT(DiGPTConfig(decoder_dim=16, decoder_heads=2), tiny_vit(final_norm=False), teacher)


# --- runs and the CLI ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("digpt") / "teacher"
    argv = ["pretrain", "configs/simmim/vit_tiny_fmnist.yaml", *TINY, "train.steps=2"]
    assert main([*argv, "--run-dir", str(run)]) == 0
    return run


@pytest.fixture(scope="module")
def digpt_run(teacher_run, tmp_path_factory):
    run = tmp_path_factory.mktemp("digpt") / "run"
    argv = ["pretrain", RECIPE, *DIGPT_TINY, "train.steps=30", f"teacher.path={teacher_run}"]
    assert main([*argv, "optim.lr=1e-3", "--run-dir", str(run)]) == 0
    return run


def test_thirty_steps_with_a_tiny_teacher_lower_the_loss(digpt_run):
    curve = losses(digpt_run)
    assert len(curve) == 30
    first, last = loss_ends(digpt_run, 3)
    assert last < first - 0.1, curve
    assert (digpt_run / "reconstruction.png").exists()
    state = torch.load(digpt_run / "checkpoints" / "last.pt", weights_only=True)
    prefixes = ("backbone.", "gen_decoder.", "dis_decoder.")
    assert all(k.startswith(prefixes) for k in state["model"])


def test_the_pretrained_encoder_is_a_plain_bidirectional_vit_for_eval_and_export(
    digpt_run, tmp_path
):
    backbone = mimar.load_backbone(digpt_run)
    x = images(2, seed=4)
    tokens = backbone(x)["tokens"]
    assert tokens.shape == (2, 17, 32)  # class token + all 16 patches, no mask
    changed = backbone(perturb_patch(x, 15))["tokens"]
    assert not torch.allclose(tokens[:, 1], changed[:, 1])  # patch 0 sees patch 15
    args = ["eval", "knn", "--checkpoint", str(digpt_run), "--max-train", "64"]
    assert main(args) == 0
    assert json.loads((digpt_run / "eval" / "knn.json").read_text())["protocol"] == "knn"
    out = tmp_path / "digpt.safetensors"
    assert (
        main(["export", "--checkpoint", str(digpt_run), "--format", "timm", "--out", str(out)]) == 0
    )
    assert out.exists()


def test_pixel_targets_are_the_student_patches_and_train(tmp_path):
    run = tmp_path / "pixels"
    argv = ["pretrain", RECIPE, *DIGPT_TINY, "train.steps=3", "teacher.kind=pixels"]
    assert main([*argv, "--run-dir", str(run)]) == 0
    assert len(losses(run)) == 3
    cfg, method = mimar.factory.load_method(run)
    assert method.teacher.dim == 4 * 4 * 1 and not method.teacher.has_cls
    x = images(2, seed=6, size=16)
    tokens = method.teacher(x)["tokens"]  # (2, 16, 16): patch r, c -> its 16 pixels
    patch_5 = x[:, 0, 4:8, 4:8].reshape(2, 16)  # row 1, column 1
    torch.testing.assert_close(tokens[:, 5], patch_5, rtol=0, atol=1e-5)
    out = method(x, order=torch.tensor([[0, 1, 2, 3], [1, 0, 3, 2]]))
    assert torch.isfinite(out["loss"])


def test_bad_settings_are_one_line_errors(teacher_run, capsys):
    base = ["pretrain", RECIPE, *DIGPT_TINY, "train.steps=1", f"teacher.path={teacher_run}"]
    assert main([*base, "method.clusters_per_side=3"]) == 2
    assert "cannot be cut into 3x3" in capsys.readouterr().err
    assert main([*base, "method.memory_layers=[1,7]"]) == 2
    assert "blocks are numbered 1..2" in capsys.readouterr().err
    assert main([*base, "teacher.kind=none"]) == 2
    assert "needs a frozen teacher" in capsys.readouterr().err
    argv = ["pretrain", "configs/eva/vit_tiny_fmnist.yaml", "teacher.kind=pixels"]
    assert main([*argv, "train.steps=1"]) == 2
    assert "pixel-target ablation" in capsys.readouterr().err


def test_two_process_ddp_matches_one_process(tmp_path):
    # the frozen final norm gets no gradient; DDP must accept that, and the per-image cluster
    # orders must be split over the ranks exactly as one process draws them
    args = [RECIPE, *DIGPT_TINY, "train.steps=3", "teacher.kind=pixels"]
    assert main(["pretrain", *args, "--run-dir", str(tmp_path / "one")]) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    cmd += [
        "--standalone",
        "-m",
        "mimar.cli",
        "pretrain",
        *args,
        "--run-dir",
        str(tmp_path / "two"),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(one) == sorted(two) == [1, 2, 3]
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-5, abs=1e-6)


# --- the paper recipe ------------------------------------------------------------------------


class _Teacher:
    """Stands in for OpenCLIP ViT-H/14 at 224 px: 1024-d features on a 16x16 grid."""

    dim, grid = 1024, (16, 16)


def test_paper_recipe_builds_the_paper_geometry():
    cfg = mimar.load_config(ROOT / "configs/digpt/vit_base_clip_in1k.yaml")
    with torch.device("meta"):
        method = DiGPT(cfg.method, build_backbone(cfg.backbone), _Teacher())
    count = sum(p.numel() for p in method.backbone.parameters() if p.requires_grad)
    assert count / 1e6 == pytest.approx(85.6, abs=0.1)  # ViT-B/16 without the final norm
    assert (method.num_clusters, method.cluster_size, method.num_slots) == (4, 49, 3)
    assert (method.student_side, method.teacher_side) == (7, 8)  # 7x7 -> 8x8 per cluster
    assert method.attn_mask.shape == (148, 148)
    assert method.memory_layers == (6, 8, 10, 12)
    dec = method.gen_decoder
    assert dec.memory_proj.weight.shape == (2 * 1024, 4 * 768) and dec.head.out_features == 1024
    assert len(dec.blocks) == 2 and dec.blocks[0].attn.num_heads == 32
    assert cfg.teacher.kind == "open_clip" and cfg.teacher.model == "ViT-H-14"
    assert (cfg.optim.lr, cfg.optim.betas, cfg.optim.weight_decay) == (2.4e-3, (0.9, 0.95), 0.05)


def test_recipe_encoder_init_zero_class_token_default_conv_bias_fused_qkv():
    # docs/METHODS.md §6.3: MAE-style xavier with one fused qkv; official class token at zero and
    # PyTorch's default conv bias
    for recipe in ("vit_tiny_fmnist", "vit_base_clip_in1k"):
        c = mimar.load_config(ROOT / f"configs/digpt/{recipe}.yaml").backbone
        assert (c.weight_init, c.qkv_init, c.cls_token_init) == ("xavier", "fused", "zeros")
        assert c.patch_bias_init == "default"
    cfg = mimar.load_config(ROOT / "configs/digpt/vit_tiny_fmnist.yaml", ["teacher.kind=pixels"])
    torch.manual_seed(0)
    vit = mimar.build_method(cfg).backbone
    assert torch.equal(vit.cls_token, torch.zeros_like(vit.cls_token))
    bias = vit.patch_embed.proj.bias.detach()
    bound = 1 / math.sqrt(cfg.backbone.in_chans * cfg.backbone.patch_size**2)
    assert bias.abs().max() <= bound and bias.abs().min() > 0
    D = cfg.backbone.embed_dim
    qkv = vit.blocks[0].attn.qkv.weight.detach()
    assert abs(qkv.std() / math.sqrt(2 / (D + 3 * D)) - 1) < 0.08
