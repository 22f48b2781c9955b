"""Training settings, without torch: the command line and the Slicer module read them before PyTorch loads."""

from dataclasses import dataclass, field
from typing import Optional

from .errors import FetalInpaintError

DEFAULT_PERCENTILES = (0.5, 99.5)
# Names of FetalInpaintLib.corruptors.CORRUPTORS and FetalInpaintLib.model.PREFILLS (tests keep them equal).
CORRUPTOR_NAMES = ("holes", "shapes", "toss")
PREFILL_NAMES = ("push-pull", "biharmonic")

#: What a training writes into its output folder (:func:`FetalInpaintLib.training.train`).
OUTPUT_FILE_NAMES = ("model.pt", "model.json", "resume.pt", "history.json", "loss_curve.png")
#: The files that show an earlier training in an output folder: its model, resume point and history.
EARLIER_TRAINING_FILE_NAMES = ("model.pt", "resume.pt", "history.json")


@dataclass
class TrainConfig:
    """Everything that defines a training run (stored in the checkpoint metadata).

    Parameters
    ----------
    corruptor : {"shapes", "holes", "toss"}, default "shapes"
    strength : float, default 0.2
        Fraction of each patch hidden (reference paper: 20 %).
    corruptor_params : dict
        Extra corruptor arguments (``size``, ``kinds``).
    epochs : int, default 20
    batch_size : int, default 64
        Per process under DistributedDataParallel.
    lr : float, default 2e-3
        AdamW peak learning rate, decayed to 0 with a cosine schedule over all steps.
    weight_decay : float, default 1e-4
    patch_size : int, default 48
    stride : int, default 24
    min_foreground : float, default 0.1
        See :func:`FetalInpaintLib.data.extract_patches`.
    percentiles : (float, float), default (0.5, 99.5)
        Per-volume intensity normalisation.
    base_channels, depth, in_channels, skip_connections, prefill
        Architecture, see :class:`FetalInpaintLib.model.InpaintingAutoencoder`. Trained by
        default with skip connections and the biharmonic prefill: on the benchmark the best
        inpainter, and the only one above biharmonic inpainting (docs/inpainting.md).
    whole_image_weight : float, default 0.0
        Weight of the whole-patch L2 term added to the hidden-region L2 loss.
    val_fraction : float, default 0.2
        Fraction of volumes held out for validation (split by volume).
    patches_per_epoch : int or None
        Random subset of training patches per epoch (None = all).
    max_val_patches : int, default 512
    patience : int, default 5
        Early stop after this many epochs without validation improvement (0 = never).
    augment : bool, default True
        Random flips and transposes of each patch.
    seed : int, default 0
    device : str, default "auto"
        "auto" = CUDA when available, else CPU.
    channels_last : bool, default True
    compile : bool, default False
        ``torch.compile`` (opt-in: slow start, needs a C++ compiler).
    max_steps : int or None
        Hard cap on optimiser steps (quick runs, tests).
    log_every : int, default 10
        Steps between progress reports.
    """

    corruptor: str = "shapes"
    strength: float = 0.2
    corruptor_params: dict = field(default_factory=dict)
    epochs: int = 20
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4
    patch_size: int = 48
    stride: int = 24
    min_foreground: float = 0.1
    percentiles: tuple = DEFAULT_PERCENTILES
    base_channels: int = 16
    depth: int = 4
    in_channels: int = 2
    skip_connections: bool = True
    prefill: object = "biharmonic"  # False, "push-pull" or "biharmonic"
    whole_image_weight: float = 0.0
    val_fraction: float = 0.2
    patches_per_epoch: Optional[int] = None
    max_val_patches: int = 512
    patience: int = 5
    augment: bool = True
    seed: int = 0
    device: str = "auto"
    channels_last: bool = True
    compile: bool = False
    max_steps: Optional[int] = None
    log_every: int = 10

    def architecture(self):
        """Architecture dict for :func:`FetalInpaintLib.model.build_model`."""
        return {
            "name": "InpaintingAutoencoder",
            "base_channels": self.base_channels,
            "depth": self.depth,
            "in_channels": self.in_channels,
            "negative_slope": 0.2,
            "skip_connections": self.skip_connections,
            "prefill": self.prefill,
        }

    def validate(self):
        """Raise :class:`FetalInpaintError` on impossible settings."""
        if self.corruptor not in CORRUPTOR_NAMES:
            raise FetalInpaintError(f"unknown corruptor {self.corruptor!r}; choose one of {sorted(CORRUPTOR_NAMES)}.")
        if not 0.0 < self.strength < 1.0:
            raise FetalInpaintError(f"strength must be in (0, 1), got {self.strength}.")
        if self.patch_size % 2**self.depth:
            raise FetalInpaintError(
                f"patch_size {self.patch_size} must be a multiple of 2**depth = {2**self.depth} "
                "(training patches are not padded)."
            )
        for name in ("epochs", "batch_size", "stride", "base_channels"):
            if getattr(self, name) < 1:
                raise FetalInpaintError(f"{name} must be >= 1, got {getattr(self, name)}.")
