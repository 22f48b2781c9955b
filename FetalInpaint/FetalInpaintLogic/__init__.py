"""GUI-free logic of the FetalInpaint Slicer module (imports slicer, vtk and FetalInpaintLib; never qt).

torch is imported only inside the methods that need it, so the module loads in a Slicer where
PyTorch is not installed yet.
"""

from .logic import (  # noqa: F401
    FetalInpaintLogic,
    TrainingProcess,
    TrainingStatus,
    VolumeData,
    defaultPythonExecutable,
    readProgress,
)
