"""GUI-free logic of the FetalInpaint Slicer module (imports slicer, vtk and FetalInpaintLib; never qt).

torch is imported only inside the methods that need it, so the module loads in a Slicer where
PyTorch is not installed yet.
"""

from .logic import (
    FetalInpaintLogic,
    TrainingProcess,
    TrainingStatus,
    VolumeData,
    defaultPythonExecutable,
    readHistory,
    readProgress,
)

__all__ = [
    "FetalInpaintLogic",
    "TrainingProcess",
    "TrainingStatus",
    "VolumeData",
    "defaultPythonExecutable",
    "readHistory",
    "readProgress",
]
