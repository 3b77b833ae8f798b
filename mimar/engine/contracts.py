"""What the engine relies on, declared: the trained module (:class:`Method`) and the step loader
(:class:`StepLoader`). The engine calls exactly these members and probes for nothing.

A method's optional members get their no-op defaults from :class:`MethodDefaults`, which every
module handed to :func:`mimar.engine.loop.fit` inherits (``class SimMIM(MethodDefaults,
nn.Module)``): a method without per-image draws or an after-step update simply does not
override them.
"""

from __future__ import annotations

from typing import Protocol

import torch


class Method(Protocol):
    """A trained ``nn.Module``: pretraining methods, the fine-tune classifier, the dense
    model."""

    def __call__(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        """``forward(**loader.inputs(step), **sample_corruption(...))`` -> ``{"loss", ...}``:
        a scalar ``loss`` plus scalars to log; optionally ``loss_terms`` (how many terms this
        rank's loss averages, when it varies per rank: the engine then weights the ranks' means
        so that their average is the global batch's mean). Never calls backward."""
        ...

    def sample_corruption(
        self, batch_size: int, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """Per-image random draws (masks, orders) of the *global* batch, ``(batch_size, ...)``
        each; the engine slices this rank's rows."""
        ...

    def after_step(self, step: int) -> None:
        """After optimizer step ``step`` (1-based): EMA teachers, EMA weights."""
        ...


class MethodDefaults:
    """No-op defaults of :class:`Method`'s optional members, for modules to inherit."""

    def sample_corruption(
        self, batch_size: int, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        return {}  # nothing drawn per image: the forward pass takes the inputs alone

    def after_step(self, step: int) -> None:
        return None


class ImageSource(Protocol):
    source: str  # where the images come from (logged once at the start)


class StepLoader(Protocol):
    """This rank's inputs for any step: data order and augmentation are pure functions of
    (seed, step), so a resumed run and a run on N processes see what one process sees."""

    batch_size: int  # the global batch, summed over ranks
    rank: int
    world_size: int
    images: ImageSource

    def inputs(self, step: int) -> dict[str, torch.Tensor]:
        """This rank's rows of micro-step ``step``'s global batch (``images``, ``targets``,
        ...), handed to the method's forward by name."""
        ...

    def generator_for(self, step: int, stream: str = "method") -> torch.Generator:
        """A CPU generator for ``step``'s draws: ``"method"`` (masks, orders) or ``"network"``
        (drop path)."""
        ...

    def epoch_of(self, step: int) -> float:
        """The fractional epoch reached at micro-step ``step`` (the x-axis of the logs)."""
        ...
