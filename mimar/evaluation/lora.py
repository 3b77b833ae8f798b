"""LoRA adaptation of a frozen backbone: low-rank adapters + a linear head, then top-1.

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", 2021, arXiv:2106.09685. A
frozen linear ``W x`` becomes ``W x + (alpha / r) · B A x`` with ``A (r, in)`` and
``B (out, r)``; ``B`` starts at zero so the adapted model starts equal to the base one, and
after training ``W + (alpha / r) · B A`` folds back into a plain linear (:func:`merge_lora`).
The adapters are peft's (``LoraConfig``, ``get_peft_model``, ``merge_and_unload``), so a
trained adapter can be saved in peft's format (:func:`save_adapter`) and loaded by anything
that reads it.

AIM (docs/METHODS.md §5) reports LoRA with rank 8 on the attention; ml-aim v1's ``LoraAttention``
(loralib) adapts q and v of ``qkv`` (not k) and ``proj``, with loralib's default alpha = 1.
Ours adapts the whole ``qkv`` and ``proj`` by default, alpha 16 (the brief's choice; both are
arguments). The training recipe is ours: AdamW lr 1e-3, weight decay 0.01 on matrices,
per-step cosine to 0, random horizontal flips of the eval view, cross-entropy on the mean of
the final patch tokens (prefix excluded).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mimar import writes
from mimar.data import ImageSet, eval_transform
from mimar.engine.precision import autocast
from mimar.errors import ConfigError
from mimar.evaluation.features import pool_tokens
from mimar.evaluation.train import fit


def add_lora(
    backbone: nn.Module,
    rank: int = 8,
    alpha: float = 16.0,
    targets: Sequence[str] = ("attn.qkv", "attn.proj"),
) -> nn.Module:
    """Freeze ``backbone`` and give every linear whose name ends in a target a LoRA adapter,
    in place (peft, dropout 0, no bias adapters); returns peft's wrapper of ``backbone``.

    Matches by name suffix, so ``attn.qkv`` finds ``blocks.{i}.attn.qkv`` of a ViT as well as
    the timm Swin blocks' ``...blocks.{j}.attn.qkv``. The adapted names are
    :func:`lora_targets`; ``A`` is Kaiming-uniform and ``B`` zero (peft's default init).
    """
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    peft = _peft()
    names = lora_targets(backbone, targets)
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=names)
    return peft.get_peft_model(backbone, config)


def lora_targets(backbone: nn.Module, targets: Sequence[str]) -> list[str]:
    """The names of the ``nn.Linear`` modules of ``backbone`` that end in one of ``targets``."""
    names = [
        name
        for name, module in backbone.named_modules()
        if isinstance(module, nn.Linear) and any(_ends_with(name, t) for t in targets)
    ]
    if not names:
        raise ValueError(f"no nn.Linear named like {tuple(targets)} in {type(backbone).__name__}")
    return names


def merge_lora(adapted: nn.Module) -> nn.Module:
    """Fold every adapter back into its linear (peft's ``merge_and_unload``): the plain
    backbone, with its own module and weight names again."""
    return adapted.merge_and_unload()


def save_adapter(adapted: nn.Module, folder: str | Path) -> Path:
    """The adapter weights and config in peft's format (``adapter_config.json``,
    ``adapter_model.safetensors``) in ``folder``."""
    with writes.guard(folder, "LoRA adapter"):  # peft writes the files: one line if it fails
        adapted.save_pretrained(str(folder))
    return Path(folder)


def _peft():
    try:
        import peft
    except ImportError:
        raise ConfigError("LoRA needs peft: pip install 'mimar[lora]'") from None
    return peft


def lora_finetune(
    backbone: nn.Module,
    train: ImageSet,
    test: ImageSet,
    *,
    img_size: int,
    rank: int = 8,
    alpha: float = 16.0,
    epochs: int = 3,
    lr: float = 1e-3,
    weight_decay: float = 0.01,
    batch_size: int = 256,
    seed: int = 0,
    attn_mask: torch.Tensor | None = None,
    device: str | torch.device = "cpu",
    autocast_dtype: torch.dtype | None = None,
    adapter_dir: str | Path | None = None,
) -> dict:
    """Add LoRA to ``backbone`` (in place), train adapters + a linear head, score on ``test``;
    with ``adapter_dir`` the trained adapter is saved there in peft's format.

    Images go through the eval view of ``iterate_eval_batches`` (resize, center crop,
    normalise with the set's mean/std) plus a random horizontal flip while training.

    Returns:
        ``{"top1", "train_loss" (last epoch mean), "trainable_params" (adapters + head),
        "adapter_params", "total_params" (backbone incl. adapters + head), "rank", "alpha",
        "epochs", "lr"}``.
    """
    if train.labels is None or test.labels is None:
        raise ValueError("LoRA fine-tuning needs labelled train and test images")
    if epochs < 1 or batch_size < 1:
        raise ValueError("need epochs >= 1 and batch_size >= 1")
    device = torch.device(device)
    num_classes = int(max(train.labels.max(), test.labels.max())) + 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        adapted = add_lora(backbone, rank, alpha)  # adapters inside ``backbone``, in place
        head = nn.Linear(backbone.embed_dim, num_classes)
    model = _Classifier(backbone, head, attn_mask).to(device)
    adapters = sum(p.numel() for p in backbone.parameters() if p.requires_grad)
    generator = torch.Generator().manual_seed(seed)
    loss = _train(
        model, train, img_size, epochs, lr, weight_decay, batch_size, generator, autocast_dtype
    )
    if adapter_dir is not None:
        with writes.optional("the LoRA adapter"):  # the scores survive a failed adapter write
            save_adapter(adapted, adapter_dir)
    return {
        "top1": _accuracy(model, test, img_size, batch_size, autocast_dtype),
        "train_loss": loss,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "adapter_params": adapters,
        "total_params": sum(p.numel() for p in model.parameters()),
        "rank": rank,
        "alpha": alpha,
        "epochs": epochs,
        "lr": lr,
    }


class _Classifier(nn.Module):
    """Backbone -> mean of the final patch tokens -> linear head."""

    def __init__(self, backbone: nn.Module, head: nn.Linear, attn_mask: torch.Tensor | None):
        super().__init__()
        self.backbone, self.head = backbone, head
        self.register_buffer("attn_mask", attn_mask, persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.backbone(images, attn_mask=self.attn_mask)["tokens"]  # (B, P+N, D)
        return self.head(pool_tokens(tokens, "avg", self.backbone.num_prefix_tokens))


def _train(model, data, img_size, epochs, lr, weight_decay, batch_size, generator, dtype) -> float:
    """Weight decay on matrices only; returns the last epoch's mean loss. See :func:`fit`."""
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim == 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim != 2], "weight_decay": 0.0},
    ]

    def step_loss(idx: torch.Tensor) -> torch.Tensor:
        x = eval_transform(data.images[idx], img_size, data.mean, data.std)  # (B, C, H, W)
        flip = torch.rand(len(idx), generator=generator) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x).to(device)
        with autocast(device, dtype):
            logits = model(x)  # (B, classes)
        return F.cross_entropy(logits.float(), data.labels[idx].to(device))

    losses = fit(
        step_loss,
        groups,
        len(data),
        epochs=epochs,
        batch_size=batch_size,
        generator=generator,
        lr=lr,
        module=model,
    )
    return losses[-1]


@torch.no_grad()
def _accuracy(model, data: ImageSet, img_size: int, batch_size: int, dtype) -> float:
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for start in range(0, len(data), batch_size):
        x = eval_transform(data.images[start : start + batch_size], img_size, data.mean, data.std)
        with autocast(device, dtype):
            logits = model(x.to(device))  # (B, classes)
        labels = data.labels[start : start + batch_size]  # type: ignore[index]
        correct += int((logits.argmax(dim=-1).cpu() == labels).sum())
    return 100.0 * correct / max(len(data), 1)


def _ends_with(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)
