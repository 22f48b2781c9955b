"""GUI-free logic of the FetalAnnotate Slicer module (imports slicer and vtk, never qt or ctk)."""

from .logic import AUTO_SUFFIX, PROBABILITY_SUFFIX, FetalAnnotateLogic, Masking, SegmentResult, classMasks

__all__ = ["FetalAnnotateLogic", "Masking", "SegmentResult", "AUTO_SUFFIX", "PROBABILITY_SUFFIX", "classMasks"]
