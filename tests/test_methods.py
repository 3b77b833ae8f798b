"""Every method: the loss stays the same number (tiny models with fixed weights and a fixed
corruption), and a forward pass without its corruption is refused."""

import pytest
import torch
from helpers import images
from tiny_methods import BUILDERS, aim, fixed_weights

# outputs of forward(images(3, seed=4), **sample_corruption(3, Generator().manual_seed(2)))
EXPECTED = {
    "simmim": {"loss": 0.881028, "mask_ratio": 0.5},
    "eva": {"loss": 0.03988, "mask_ratio": 0.375},
    "itpn": {"loss": 1.389897, "loss_pixel": 1.050543, "loss_mfm": 1.13118, "mask_ratio": 0.75},
    "itpn_clip": {"loss": 1.005486, "loss_main": 0.535372, "loss_aux": 0.470115},
    "aim": {"loss": 1.051494, "prefix_len": 9.666667},
    "digpt": {"loss": 3.915637, "loss_gen": 1.95253, "loss_dis": 1.963107},
}


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_loss_is_the_same_number_as_before(kind):
    method = fixed_weights(BUILDERS[kind]()).train()
    corruption = method.sample_corruption(3, torch.Generator().manual_seed(2))
    out = method(images(3, seed=4), **corruption)
    for key, value in EXPECTED[kind].items():
        assert out[key].item() == pytest.approx(value, rel=1e-5, abs=1e-6), key


@pytest.mark.parametrize("kind", list(BUILDERS))
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
