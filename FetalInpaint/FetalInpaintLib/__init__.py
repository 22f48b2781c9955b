"""FetalInpaintLib: self-supervised inpainting pretraining and feature export (no Slicer imports).

Modules
-------
config      : ``TrainConfig`` and the corruptor / prefill names (no torch).
control     : output-folder lock, stop file, process-tree kill (stdlib only).
corruptors  : numpy and batched torch corruptions (holes, shapes, biased toss).
data        : intensity normalisation, acquisition-axis slices, patches, split by volume.
model       : fully convolutional inpainting autoencoder.
training    : ``TrainConfig``, ``train``, ``load_checkpoint``.
evaluation  : PSNR / SSIM against mean fill and biharmonic inpainting.
features    : dense feature maps, patch embeddings, t-SNE plots.
probe       : brain vs non-brain patch probe.
train       : training command line (``python -m FetalInpaintLib.train``, torchrun).
__main__    : ``python -m FetalInpaintLib train | evaluate | export``.
"""

__version__ = "0.1.0"

from .errors import (  # noqa: F401
    CheckpointError,
    FetalInpaintError,
    InvalidVolumeError,
    ArchitectureMismatchError,
    TrainingLockedError,
)
