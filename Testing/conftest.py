"""Shared pytest fixtures: a real, GUI-free Slicer MRML scene from the ``slicer-core`` wheel.

The desktop application wires its core logics into ``slicer.mrmlScene`` and
``slicer.modules.<name>.logic()``; ``slicer.util`` looks them up there.  The ``mrml_scene``
fixture does the same wiring with the real slicer-core logic objects (no stand-ins), so
``slicer.util.addVolumeFromArray``, ``updateSegmentBinaryLabelmapFromArray`` and
``arrayFromSegmentBinaryLabelmap`` behave as in Slicer.
"""

import csv
import sys
import types
from pathlib import Path

import pytest

REPOSITORY_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPOSITORY_ROOT.parent / "shared" / "data"

# The module folders hold the importable packages (FetalAnnotateLib, FetalAnnotateLogic, ...),
# exactly as Slicer puts a scripted module's folder on sys.path; the benchmarks folder holds the
# robot user (robot_user.py) and the case loader that tests share with the benchmarks.
for module_dir in ("FetalAnnotate", "FetalInpaint", "Testing/benchmarks"):
    path = str(REPOSITORY_ROOT / module_dir)
    if path not in sys.path:
        sys.path.insert(0, path)


class _LoadedModule:
    """What ``slicer.modules.<name>`` is for a loaded module: something with ``logic()``."""

    def __init__(self, logic):
        self._logic = logic

    def logic(self):
        return self._logic


def start_headless_slicer():
    """Create a scene and register the real slicer-core logics as the application does.

    Returns
    -------
    slicer.vtkMRMLScene
        The new scene, also set as ``slicer.mrmlScene``.
    """
    import slicer
    import slicer.util  # noqa: F401  (makes slicer.util an attribute of slicer)

    scene = slicer.vtkMRMLScene()
    app_logic = slicer.vtkSlicerApplicationLogic()
    app_logic.SetMRMLScene(scene)

    color_logic = slicer.vtkMRMLColorLogic()
    color_logic.SetMRMLApplicationLogic(app_logic)
    color_logic.SetMRMLScene(scene)
    color_logic.AddDefaultColorNodes()
    app_logic.SetModuleLogic("Colors", color_logic)

    logics = {"colors": color_logic}
    for name, module_name, logic_class in (
        ("volumes", "Volumes", slicer.vtkSlicerVolumesLogic),
        ("segmentations", "Segmentations", slicer.vtkSlicerSegmentationsModuleLogic),
        ("transforms", "Transforms", slicer.vtkSlicerTransformLogic),
    ):
        logic = logic_class()
        logic.SetMRMLScene(scene)
        logic.SetMRMLApplicationLogic(app_logic)
        app_logic.SetModuleLogic(module_name, logic)
        logics[name] = logic

    slicer.mrmlScene = scene
    slicer.app_logic = app_logic
    slicer.modules = types.SimpleNamespace(**{name: _LoadedModule(logic) for name, logic in logics.items()})
    return scene


@pytest.fixture
def mrml_scene():
    """A fresh MRML scene with the volumes, segmentations, colors and transforms logics."""
    import slicer

    scene = start_headless_slicer()
    yield scene
    scene.Clear(True)
    del slicer.mrmlScene


def load_cases(dataset=None):
    """Rows of ``../shared/data/cases.csv`` (optionally one dataset), or skip when absent."""
    manifest = SHARED_DATA / "cases.csv"
    if not manifest.exists():
        pytest.skip(f"development data not found at {SHARED_DATA}")
    with open(manifest, newline="") as handle:
        rows = list(csv.DictReader(handle))
    return [row for row in rows if dataset is None or row["dataset"] == dataset]


def load_case_arrays(row):
    """Image (float32, z,y,x), boolean target mask, spacing (z,y,x mm) of one case row."""
    from robot_benchmark import load_case

    image, target, spacing, _ = load_case(row, SHARED_DATA)
    return image, target, spacing


@pytest.fixture
def torch_one_thread():
    """One intra-op torch thread: tiny models run faster without thread hand-offs, even on busy CI."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def shared_data():
    """Path of the development data folder; skips the test when it is not present."""
    if not SHARED_DATA.exists():
        pytest.skip(f"development data not found at {SHARED_DATA}")
    return SHARED_DATA


def write_scaled_nifti(path, array, slope=1.5, intercept=3.0):
    """An integer NIfTI file whose header scales its values (``scl_slope``, ``scl_inter``), as
    dcm2niix writes Philips scans; ITK reads such a file as float. Gzipped for ``.nii.gz``."""
    import gzip
    import struct

    import SimpleITK as sitk

    path = Path(path)
    plain = path.with_name(path.name.replace(".nii.gz", ".nii") + ".unscaled.nii")
    sitk.WriteImage(sitk.GetImageFromArray(array), str(plain))
    header = bytearray(plain.read_bytes())
    plain.unlink()
    header[112:120] = struct.pack("<ff", slope, intercept)  # scl_slope, scl_inter in the 348-byte header
    path.write_bytes(gzip.compress(bytes(header)) if path.name.endswith(".gz") else bytes(header))
    return path
