"""Exception hierarchy: every message says what went wrong and what to do about it."""


class FetalInpaintError(ValueError):
    """Base class of all FetalInpaintLib errors (a ``ValueError`` so callers may catch either)."""


class InvalidVolumeError(FetalInpaintError):
    """A volume is missing, empty, too small for a patch, or holds NaN / infinite values."""


class CheckpointError(FetalInpaintError):
    """A checkpoint file is missing, unreadable or corrupt."""


class ArchitectureMismatchError(CheckpointError):
    """A checkpoint's weights do not fit the requested or declared architecture."""



class TrainingLockedError(FetalInpaintError):
    """Another live training holds the output folder's lock (see :mod:`FetalInpaintLib.control`)."""
