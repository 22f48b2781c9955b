"""GUI-free logic of the FetalAnnotate Slicer module (imports slicer and vtk, never qt or ctk)."""

from .logic import (
    AUTO_SUFFIX,
    EDITED_SUFFIX,
    PROBABILITY_SUFFIX,
    FetalAnnotateLogic,
    Masking,
    SegmentResult,
    SessionCache,
    classMasks,
    sessionCacheOf,
)

__all__ = ["FetalAnnotateLogic", "Masking", "SegmentResult", "SessionCache", "sessionCacheOf", "AUTO_SUFFIX",
           "EDITED_SUFFIX", "PROBABILITY_SUFFIX", "classMasks"]
