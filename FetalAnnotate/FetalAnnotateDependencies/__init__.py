"""Install the Python packages the FetalAnnotate extension needs and Slicer does not ship.

Used by both modules (FetalAnnotate, FetalInpaint) and by the "Random forest" Segment Editor
effect. Each module lists its packages in ``Resources/<Module>-requirements.txt`` (pip
requirement syntax; the two modules install into one folder, hence the module name in the
file name).

:func:`readRequirements` and :func:`missingRequirements` are plain Python (tested headless).
:func:`ensureRequirements` and :func:`ensureTorch` need the Slicer application; they ask the user
before anything is downloaded, never download in testing mode (``--testing``), and never raise:
a decline or a failed installation comes back as a :class:`DependencyStatus` whose message the
panel shows, so no exception reaches a Qt slot.
"""

import importlib
import importlib.metadata
import importlib.util
import inspect
import logging
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

from packaging.requirements import Requirement

_COMMENT = re.compile(r"(^|\s)#.*$")  # pip: "#" at the start or after whitespace begins a comment


@dataclass(frozen=True)
class DependencyStatus:
    """Whether the packages are importable now, and if not, why (a sentence for the status line).

    Attributes
    ----------
    ok : bool
    message : str
        Empty when ``ok``.
    """

    ok: bool
    message: str = ""


def readRequirements(path):
    """The requirements of a pip requirements file, as strings.

    Blank lines, comments (whole-line and trailing ``# ...``) and pip options (``-r``, ``--index-url``,
    ...) are skipped, as ``slicer.packaging.load_requirements`` does.

    Raises
    ------
    packaging.requirements.InvalidRequirement
        A line is not a valid requirement.
    """
    requirements = []
    with open(path, encoding="utf-8") as lines:
        for line in lines:
            line = _COMMENT.sub("", line).strip()
            if line and not line.startswith(("#", "-")):
                requirements.append(str(Requirement(line)))
    return requirements


def missingRequirements(requirements):
    """The requirements that the installed distributions do not satisfy.

    A requirement is satisfied when its distribution is installed in a version its specifier
    allows (an installed pre-release counts), or when its environment marker excludes this
    Python; the same rule as ``slicer.packaging.pip_check``.

    Parameters
    ----------
    requirements : iterable of str

    Returns
    -------
    list of str
        The unsatisfied ones, in the given order.
    """
    missing = []
    for text in requirements:
        requirement = Requirement(text)
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        try:
            installed = importlib.metadata.version(requirement.name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(text)
            continue
        if not requirement.specifier.contains(installed, prereleases=True):
            missing.append(text)
    return missing


def ensureRequirements(requirementsPath, requester):
    """Install the missing requirements of a requirements file with pip, after the user agrees.

    Uses ``pip_ensure`` where this Slicer has it (``slicer.packaging``, from 5.12; looked up by
    feature, not by version number), which asks the user itself; otherwise asks here and calls
    ``slicer.util.pip_install``. Either way pip gets :func:`writeNumpyConstraint`'s file, so
    Slicer's numpy stays as it is. In testing mode nothing is downloaded.

    Parameters
    ----------
    requirementsPath : str or Path
    requester : str
        Who asks (shown in the dialogs and messages), e.g. "FetalAnnotate".

    Returns
    -------
    DependencyStatus
    """
    missing = missingRequirements(readRequirements(requirementsPath))
    if not missing:
        return DependencyStatus(True)
    import slicer

    needed = f"{requester} needs the Python packages {', '.join(missing)}"
    if slicer.app.testingEnabled():
        return DependencyStatus(False, f"{needed}; nothing is downloaded in testing mode: install them first.")
    pipEnsure = _pipEnsure()
    try:
        with tempfile.TemporaryDirectory() as folder:
            constraints = writeNumpyConstraint(folder)
            if pipEnsure is not None:
                pipEnsure(missing, constraints=constraints, requester=requester)
            else:
                if not slicer.util.confirmOkCancelDisplay(
                        f"{needed}, not yet installed in this Slicer.\n\nDownload and install them now (once)?",
                        windowTitle=f"{requester}: install Python packages"):
                    return DependencyStatus(False, f"{needed}: installation declined. Run again to be asked again.")
                with slicer.util.WaitCursor():
                    slicer.util.pip_install(missing + ["-c", constraints])
    except RuntimeError as error:  # pip_ensure's "User declined package installation", among others
        return DependencyStatus(False, f"{needed}: not installed ({error}). Run again to be asked again.")
    except (subprocess.CalledProcessError, OSError) as error:
        logging.exception(f"{requester}: installing {missing} failed")
        return DependencyStatus(False, f"{needed}: pip failed ({error}); see the Python console for pip's "
                                       "output (a package that needs another numpy than Slicer's cannot be "
                                       "installed: update Slicer), check the network connection, and try again.")
    importlib.invalidate_caches()
    stillMissing = missingRequirements(missing)
    if stillMissing:
        return DependencyStatus(False, f"{requester}: {', '.join(stillMissing)} still missing after the "
                                       "installation; restart Slicer and try again.")
    return DependencyStatus(True)


def writeNumpyConstraint(folder):
    """Write a pip constraints file that holds numpy at its installed version; returns its path.

    Slicer is built against the numpy it ships, and numba caps the numpy versions it supports:
    without the constraint, pip would replace Slicer's numpy by an older one rather than fail.
    """
    path = os.path.join(folder, "constraints.txt")
    with open(path, "w", encoding="utf-8") as constraints:
        constraints.write(f"numpy=={importlib.metadata.version('numpy')}\n")
    return path


def torchInstalled():
    """True when a ``torch`` package can be found; it is not imported (that takes seconds and can fail)."""
    return importlib.util.find_spec("torch") is not None


def ensureTorch(requester):
    """Make PyTorch importable: install it with the PyTorch extension after the user agrees, then load it.

    After an ``ok`` status ``import torch`` succeeds at once. In testing mode nothing is
    downloaded.

    Parameters
    ----------
    requester : str
        Who asks, e.g. "FetalInpaint".

    Returns
    -------
    DependencyStatus
    """
    if not torchInstalled():
        import slicer

        if slicer.app.testingEnabled():
            return DependencyStatus(False, f"{requester} needs PyTorch; nothing is downloaded in testing mode: "
                                           "install it first (PyTorch Utils module).")
        try:
            import PyTorchUtils
        except ModuleNotFoundError:
            return DependencyStatus(False, f"{requester} needs the PyTorch extension: install 'PyTorch' from the "
                                           "Extensions Manager, restart Slicer and try again.")
        if not slicer.util.confirmOkCancelDisplay(
                f"{requester} needs PyTorch, which is not installed yet. Download and install it now? This can "
                "take several minutes and a few gigabytes of disk space.",
                windowTitle=f"{requester}: install PyTorch"):
            return DependencyStatus(False, f"{requester} needs PyTorch: installation declined. Run again to be "
                                           "asked again, or install it from the PyTorch Utils module.")
        try:
            with slicer.util.WaitCursor():
                installed = PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False)
        except Exception as error:  # the PyTorch extension's installer raises pip's and its own errors
            logging.exception(f"{requester}: installing PyTorch failed")
            return DependencyStatus(False, f"Installing PyTorch failed ({error}); see the Python console, or "
                                           "install it from the PyTorch Utils module.")
        if installed is None:
            return DependencyStatus(False, "PyTorch was not installed; install it from the PyTorch Utils module.")
        importlib.invalidate_caches()
    try:
        importlib.import_module("torch")
    except (ImportError, OSError) as error:  # OSError: a DLL of torch failed to load (Windows)
        logging.exception(f"{requester}: importing torch failed")
        return DependencyStatus(False, f"PyTorch is installed but cannot be loaded ({error}). Reinstall it "
                                       "(PyTorch Utils module: uninstall, restart Slicer, install) and restart "
                                       "Slicer; on Windows also install the Microsoft Visual C++ Redistributable.")
    return DependencyStatus(True)


def _pipEnsure():
    """``pip_ensure`` of this Slicer (``slicer.packaging``; ``slicer.pydeps`` in some 5.11 builds), or None.

    Only a ``pip_ensure`` that takes ``constraints`` is used, so that Slicer's numpy is kept
    (:func:`writeNumpyConstraint`); without one, the caller asks and runs ``pip_install`` itself.
    """
    for moduleName in ("slicer.packaging", "slicer.pydeps"):
        try:
            module = importlib.import_module(moduleName)
        except ImportError:
            continue
        pipEnsure = getattr(module, "pip_ensure", None)
        if pipEnsure is not None and "constraints" in inspect.signature(pipEnsure).parameters:
            return pipEnsure
    return None
