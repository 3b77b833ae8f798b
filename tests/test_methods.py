"""Every method: the loss stays the same number (tiny models with fixed weights and a fixed
corruption), a forward pass without its corruption is refused, and a backbone that does not
fit the method is refused when the method is built, read from the Backbone contract."""

import pytest
import torch
from helpers import images, patch_teacher, tiny_vit
from tiny_methods import BUILDERS, HIVIT, aim, fixed_weights

from mimar import names
from mimar.backbones.hivit import HiViT, HiViTConfig
from mimar.backbones.swin import Swin, SwinConfig
from mimar.methods.aim import AIM, AIMConfig
from mimar.methods.digpt import DiGPT, DiGPTConfig
from mimar.methods.eva import EVA, EVAConfig
from mimar.methods.itpn import ITPN, ITPNConfig
from mimar.methods.itpn_clip import ITPNCLIP, ITPNCLIPConfig
from mimar.methods.simmim import SimMIM, SimMIMConfig

# outputs of forward(images(3, seed=4), **sample_corruption(3, Generator().manual_seed(2)));
# swept over names.METHODS: a method added there needs its tiny builder and its numbers here
EXPECTED = {
    "simmim": {"loss": 0.881028, "mask_ratio": 0.5},
    "eva": {"loss": 0.03988, "mask_ratio": 0.375},
    "itpn": {"loss": 1.389897, "loss_pixel": 1.050543, "loss_mfm": 1.13118, "mask_ratio": 0.75},
    "itpn_clip": {"loss": 1.005486, "loss_main": 0.535372, "loss_aux": 0.470115},
    "aim": {"loss": 1.051494, "prefix_len": 9.666667},
    "digpt": {"loss": 3.915637, "loss_gen": 1.95253, "loss_dis": 1.963107},
}


@pytest.mark.parametrize("kind", list(names.METHODS))
def test_loss_is_the_same_number_as_before(kind):
    method = fixed_weights(BUILDERS[kind]()).train()
    corruption = method.sample_corruption(3, torch.Generator().manual_seed(2))
    out = method(images(3, seed=4), **corruption)
    for key, value in EXPECTED[kind].items():
        assert out[key].item() == pytest.approx(value, rel=1e-5, abs=1e-6), key


@pytest.mark.parametrize("kind", list(names.METHODS))
def test_forward_without_its_corruption_is_refused(kind):
    method = BUILDERS[kind]()
    (name,) = method.sample_corruption(2)  # the one keyword forward() requires
    with pytest.raises(TypeError, match=name):
        method(images(2))


@pytest.mark.parametrize(
    "prefix, message",
    [
        (dict(prefix_min=16), "method.prefix_min=16 must be <= 15"),
        (dict(prefix_min=20), "method.prefix_min=20 must be <= 15"),
        (dict(prefix_max=16), "method.prefix_max must be < 16"),
    ],
)
def test_aim_refuses_a_prefix_of_every_patch_when_built(prefix, message):
    # 4x4 = 16 patches: S may be at most N - 1 = 15, or no patch is left to predict
    with pytest.raises(ValueError, match=message):
        aim(**prefix)
    assert aim(prefix_min=15).prefix_range == (15, 15)


def _swin():
    kw = dict(img_size=16, in_chans=1, embed_dim=16, depths=(2, 2), num_heads=(2, 4))
    return Swin(SwinConfig(**kw, window_size=2, use_mask_token=True))


def _hivit(**kw):
    return HiViT(HiViTConfig(**HIVIT, **kw))


def _teacher():
    return patch_teacher(grid=(4, 4))


# (builder of a method on a given backbone, a backbone it refuses, words of the error)
REFUSALS = [
    (lambda b: SimMIM(SimMIMConfig(mask_patch_size=8), b), tiny_vit, "use_mask_token=true"),
    (lambda b: EVA(EVAConfig(), b, _teacher()), tiny_vit, "use_mask_token=true"),
    (lambda b: EVA(EVAConfig(), b, _teacher()), _swin, "backbone.name=vit"),
    (lambda b: EVA(EVAConfig(), b, _teacher()), lambda: _hivit(use_mask_token=True), "name=vit"),
    (lambda b: AIM(AIMConfig(), b), tiny_vit, "class_token=false"),
    (lambda b: AIM(AIMConfig(), b), _hivit, "backbone.name=vit"),
    (lambda b: DiGPT(DiGPTConfig(), b, _teacher()), _hivit, "backbone.name=vit"),
    (lambda b: DiGPT(DiGPTConfig(), b, _teacher()), tiny_vit, "backbone.final_norm=false"),
    (lambda b: ITPN(ITPNConfig(decoder_dim=32), b), tiny_vit, "backbone.name=hivit"),
    (lambda b: ITPN(ITPNConfig(decoder_dim=32), b), _swin, "backbone.name=hivit"),
    (lambda b: ITPNCLIP(ITPNCLIPConfig(), b, _teacher()), _hivit, "use_mask_token=true"),
    (lambda b: ITPNCLIP(ITPNCLIPConfig(), b, _teacher()), _swin, "backbone.name=hivit"),
    (
        lambda b: ITPNCLIP(ITPNCLIPConfig(), b, _teacher()),
        lambda: tiny_vit(use_mask_token=True),
        "backbone.name=hivit",
    ),
]


@pytest.mark.parametrize("build, backbone, words", REFUSALS)
def test_a_backbone_that_does_not_fit_is_refused_when_built(build, backbone, words):
    with pytest.raises(ValueError, match=words):
        build(backbone())
