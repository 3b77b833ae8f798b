"""Images/s of a SimMIM training step vs a plain classification step of the same backbone.

    python benchmarks/step_time.py                         # the demo recipe, bf16
    python benchmarks/step_time.py configs/simmim/swin_tiny_fmnist.yaml train.precision=fp32

Both steps run forward + backward + AdamW on the same backbone, batch and precision. The
classification step is mean-pooled tokens -> Linear -> cross-entropy on random labels; the
SimMIM step adds the mask draw, the mask token, the pixel-shuffle head and the masked L1.
Their ratio is the cost of the pretext task over ordinary supervised training.
"""

from __future__ import annotations

import argparse
import time
from contextlib import nullcontext

import torch
from torch import nn

import mimar
from mimar.engine.optim import build_optimizer


class Classifier(nn.Module):
    def __init__(self, backbone: nn.Module, num_classes: int = 10) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.embed_dim, num_classes)

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> dict:
        tokens = self.backbone(images)["tokens"][:, self.backbone.num_prefix_tokens :]
        return {"loss": nn.functional.cross_entropy(self.head(tokens.mean(1)), labels)}


class Stepper:
    """One model + AdamW; ``step()`` runs forward, backward and the update, returns seconds."""

    def __init__(self, model: nn.Module, make_inputs, cfg) -> None:
        self.model, self.make_inputs = model, make_inputs
        self.optimizer = build_optimizer(model, cfg.optim, lr=1e-4)
        bf16 = cfg.train.precision == "bf16"
        self.autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()

    def step(self) -> float:
        tic = time.perf_counter()
        inputs = self.make_inputs()
        with self.autocast:
            loss = self.model(**inputs)["loss"]
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return time.perf_counter() - tic


def images_per_s(steppers: dict, batch: int, steps: int, warmup: int) -> dict:
    """Alternate the steppers step by step, so that load from other processes hits both."""
    seconds = dict.fromkeys(steppers, 0.0)
    for i in range(warmup + steps):
        for name, stepper in steppers.items():
            elapsed = stepper.step()
            if i >= warmup:
                seconds[name] += elapsed
    return {name: steps * batch / s for name, s in seconds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("config", nargs="?", default="configs/simmim/vit_tiny_fmnist.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = mimar.load_config(args.config, args.overrides)
    b, c, s = cfg.data.batch_size, cfg.backbone.in_chans, cfg.data.img_size
    images = torch.randn(b, c, s, s)

    torch.manual_seed(0)
    method = mimar.build_method(cfg)
    torch.manual_seed(0)
    classifier = Classifier(mimar.build_backbone(cfg.backbone))
    labels = torch.randint(0, 10, (b,))
    steppers = {
        "pretext": Stepper(method, lambda: {"images": images, **method.sample_corruption(b)}, cfg),
        "plain": Stepper(classifier, lambda: {"images": images, "labels": labels}, cfg),
    }
    speed = images_per_s(steppers, b, args.steps, args.warmup)
    pretext, plain = speed["pretext"], speed["plain"]
    print(
        f"{args.config}: batch {b}, {s} px, {cfg.train.precision}, "
        f"{args.threads} threads, {args.steps} timed steps"
    )
    print(f"  {cfg.method.name} step      {pretext:8.1f} images/s")
    print(f"  classification step {plain:8.1f} images/s")
    print(f"  ratio (classification / {cfg.method.name}) {plain / pretext:.2f}x")


if __name__ == "__main__":
    main()
