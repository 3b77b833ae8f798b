"""One tiny instance of every method (16 px, 1 channel, patch 4: a 4x4 grid), for tests that
sweep all of them (they sweep ``names.METHODS``: a method added there fails them until it has
a builder here); ``fixed_weights`` makes their outputs independent of initialisation order."""

import zlib

import torch
from helpers import patch_teacher, tiny_vit

from mimar.backbones.hivit import HiViT, HiViTConfig
from mimar.methods.aim import AIM, AIMConfig
from mimar.methods.digpt import DiGPT, DiGPTConfig
from mimar.methods.eva import EVA, EVAConfig
from mimar.methods.itpn import ITPN, ITPNConfig
from mimar.methods.itpn_clip import ITPNCLIP, ITPNCLIPConfig
from mimar.methods.simmim import SimMIM, SimMIMConfig

HIVIT = dict(img_size=16, patch_size=4, in_chans=1, embed_dim=32, mlp_depth=1, depth=2, num_heads=2)


def _teacher():
    return patch_teacher(grid=(4, 4), mean=0.5, std=0.5)


def simmim() -> SimMIM:
    return SimMIM(SimMIMConfig(mask_patch_size=8, mask_ratio=0.5), tiny_vit(use_mask_token=True))


def eva() -> EVA:
    return EVA(EVAConfig(min_num_patches=2), tiny_vit(use_mask_token=True), _teacher())


def itpn() -> ITPN:
    cfg = ITPNConfig(fpn_dim=16, decoder_dim=32, decoder_depth=1, decoder_num_heads=2)
    return ITPN(cfg, HiViT(HiViTConfig(**HIVIT)))


def itpn_clip() -> ITPNCLIP:
    cfg = ITPNCLIPConfig(fpn_dim=16, num_mask_patches=6, min_num_patches=4)
    return ITPNCLIP(cfg, HiViT(HiViTConfig(**HIVIT, use_mask_token=True)), _teacher())


def aim(**kw) -> AIM:
    trunk = tiny_vit(class_token=False, pos_embed="sincos", qkv_bias=False, proj_bias=False)
    return AIM(AIMConfig(**{"order": "spiral", "head_width": 32, "head_depth": 2, **kw}), trunk)


def digpt() -> DiGPT:
    trunk = tiny_vit(pos_embed="sincos", final_norm=False)
    return DiGPT(DiGPTConfig(decoder_dim=16, decoder_heads=2), trunk, _teacher())


BUILDERS = {
    "simmim": simmim,
    "eva": eva,
    "itpn": itpn,
    "itpn_clip": itpn_clip,
    "aim": aim,
    "digpt": digpt,
}


def fixed_weights(method: torch.nn.Module) -> torch.nn.Module:
    """Every parameter of ``method`` (and of its frozen teacher, if any) drawn from a generator
    seeded by the parameter's own name, so that outputs do not depend on the order in which
    constructors draw their initial weights."""
    teacher = getattr(method, "teacher", None)
    modules = [method, *([teacher.module] if teacher is not None else [])]
    with torch.no_grad():
        for module in modules:
            for name, p in module.named_parameters():
                gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    return method
