"""FetalAnnotate engine: interactive fetal-MRI segmentation from a few paint strokes.

numpy / scipy / scikit-learn / scikit-image / numba; no Slicer import, so it runs and is tested
outside Slicer. See ``docs/engine.md``.
"""

from .engine import (
    DEFAULT_FOREST,
    MEMORY,
    MEMORY_REACH_MM,
    OUTLINE_MARGIN_MM,
    PSEUDO_LABEL_REACH_MM,
    SMOOTHNESS,
    AnnotationSession,
    PixelClassifier,
    SegmentationResult,
)
from .features import FEATURE_PRESETS, compute_features
from .validation import FetalAnnotateError, ImageError, OperationCancelled, StrokeError

__all__ = [
    "AnnotationSession",
    "SegmentationResult",
    "PixelClassifier",
    "FetalAnnotateError",
    "StrokeError",
    "ImageError",
    "OperationCancelled",
    "FEATURE_PRESETS",
    "DEFAULT_FOREST",
    "MEMORY",
    "MEMORY_REACH_MM",
    "OUTLINE_MARGIN_MM",
    "PSEUDO_LABEL_REACH_MM",
    "SMOOTHNESS",
    "compute_features",
]
