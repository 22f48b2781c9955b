"""Save and load trained pixel classifiers as ``skops`` files (no arbitrary pickle is ever loaded).

A classifier file holds the forest, the feature settings that produced its training features,
the class values and their names (the segment names the user painted), the scikit-learn version
that trained it and this file format's version. Loading refuses, with a message that says what to
do, any file that is not such a file, that is corrupted, that holds types outside an explicit
trusted list, that holds trees scikit-learn could not have grown (scikit-learn follows their node
indices without bounds checks: such a file would crash the application), or that was written by
an incompatible FetalAnnotate or scikit-learn version (told before the file is loaded).
"""

import json
import math
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .segio import atomic_path
from .validation import FetalAnnotateError

FORMAT_NAME = "FetalAnnotate pixel classifier"
FORMAT_VERSION = 1
FILE_SUFFIX = ".skops"

# Types that skops does not trust by default but a fitted scikit-learn forest needs; nothing else
# outside skops' default trusted set is ever accepted.
TRUSTED_TYPES = ("sklearn.tree._tree.Tree",)
_FOREST_MODULE_PREFIX = "sklearn.ensemble."


class ClassifierFileError(FetalAnnotateError):
    """A classifier file cannot be loaded: foreign, corrupted or from an incompatible version."""


@dataclass(frozen=True)
class SavedClassifier:
    """A classifier read from a file, with what was stored beside it.

    Attributes
    ----------
    classifier : PixelClassifier
        Ready for ``predict_proba(image, spacing)``.
    class_names : tuple of str
        Name of each class, in the order of ``classifier.classes``.
    sklearn_version : str
        scikit-learn version that trained the forest.
    format_version : int
        Version of the file format.
    metadata : dict
        Free JSON-able information saved with the classifier (e.g. the training volume's name).
    """

    classifier: object
    class_names: tuple
    sklearn_version: str
    format_version: int
    metadata: dict


def save_classifier(path, classifier, class_names, metadata=None):
    """Write a trained classifier to a ``.skops`` file.

    Parameters
    ----------
    path : str or Path
        Output file (``.skops`` is appended when the name has another suffix).
    classifier : PixelClassifier
        Trained classifier, e.g. ``AnnotationSession.pixel_classifier()``.
    class_names : sequence of str
        One name per entry of ``classifier.classes`` (e.g. the stroke segments' names).
    metadata : dict, optional
        JSON-able information to keep with the classifier.

    Returns
    -------
    Path
        The written file.
    """
    import sklearn
    import skops.io

    classes = [int(value) for value in classifier.classes]
    names = [str(name) for name in class_names]
    if len(names) != len(classes):
        raise ClassifierFileError(f"{len(names)} class names given for {len(classes)} classes {classes}")
    path = Path(path)
    if path.suffix != FILE_SUFFIX:
        path = path.with_name(path.name + FILE_SUFFIX)
    content = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "sklearn_version": sklearn.__version__,
        "classes": classes,
        "class_names": names,
        # JSON text keeps the settings free of any type skops would have to trust.
        "feature_settings": json.dumps(classifier.feature_settings),
        "metadata": json.dumps(metadata or {}),
        "forest": classifier.forest,
    }
    with atomic_path(path) as temporary:  # an interrupted save keeps the previous file
        skops.io.dump(content, temporary, compression=8)
    return path


def load_classifier(path):
    """Read a classifier written by :func:`save_classifier`.

    Parameters
    ----------
    path : str or Path
        A ``.skops`` classifier file.

    Returns
    -------
    SavedClassifier

    Raises
    ------
    ClassifierFileError
        If the file is missing, not a FetalAnnotate classifier, corrupted, holds untrusted types,
        holds trees that could crash the application, or was written by an incompatible
        FetalAnnotate or scikit-learn version.
    """
    import skops.io

    from .engine import PixelClassifier

    path = Path(path)
    if not path.is_file():
        raise ClassifierFileError(f"classifier file {path} does not exist")
    try:
        untrusted = skops.io.get_untrusted_types(file=path)
    except Exception as error:  # skops raises zip, JSON and key errors alike for foreign files
        raise ClassifierFileError(f"{path} is not a FetalAnnotate classifier file (not a readable skops file: "
                                  f"{error}); "
                                  "choose a file saved with 'Save classifier'") from error
    header = _saved_header(path)
    if header.get("format") == FORMAT_NAME:  # before loading: another version's trees may neither load nor be trusted
        _check_versions(path, header.get("format_version"), header.get("sklearn_version"))
    foreign = sorted(set(untrusted) - set(TRUSTED_TYPES))
    if foreign:
        raise ClassifierFileError(f"{path} holds types a FetalAnnotate classifier never contains "
                                  f"({', '.join(foreign)}); "
                                  "it was not written by FetalAnnotate and is not loaded for safety")
    try:
        content = skops.io.load(path, trusted=list(TRUSTED_TYPES))
    except Exception as error:
        raise ClassifierFileError(f"{path} is corrupted and cannot be read ({error}); "
                                  "save the classifier again") from error
    if not isinstance(content, dict) or content.get("format") != FORMAT_NAME:
        raise ClassifierFileError(f"{path} is a skops file but not a FetalAnnotate classifier; "
                                  "choose a file saved with 'Save classifier'")
    format_version = content.get("format_version")
    saved_version = _check_versions(path, format_version, content.get("sklearn_version"))
    try:
        forest = content["forest"]
        classes = tuple(int(value) for value in content["classes"])
        names = tuple(str(name) for name in content["class_names"])
        settings = json.loads(content["feature_settings"])
        metadata = json.loads(content.get("metadata", "{}"))
    except (KeyError, TypeError, ValueError) as error:
        raise ClassifierFileError(f"{path} is an incomplete FetalAnnotate classifier ({error}); "
                                  "save it again") from error
    if not type(forest).__module__.startswith(_FOREST_MODULE_PREFIX) or len(names) != len(classes):
        raise ClassifierFileError(f"{path} does not hold a scikit-learn forest with one name per class; save it again")
    problem = forest_problem(forest)
    if problem:
        raise ClassifierFileError(f"{path} is damaged or was not written by FetalAnnotate: {problem}. "
                                  "It is not applied, for safety; save the classifier again from FetalAnnotate")
    forest_classes = [int(value) for value in forest.classes_]
    if forest_classes != list(classes):
        raise ClassifierFileError(f"{path} is inconsistent: its forest predicts classes "
                                  f"{forest_classes}, not {list(classes)}; save it again")
    problem = feature_settings_problem(settings, forest.n_features_in_)
    if problem:
        raise ClassifierFileError(f"{path} has invalid feature settings: {problem}. The file was edited or damaged; "
                                  "save the classifier again from FetalAnnotate")
    return SavedClassifier(
        classifier=PixelClassifier(settings, forest, classes),
        class_names=names,
        sklearn_version=saved_version,
        format_version=format_version,
        metadata=metadata,
    )


def _saved_header(path):
    """The format name and versions saved in a skops classifier file, read without loading it.

    skops keeps the plain values of the saved dict as JSON text in the file's ``schema.json``, so
    they can be read before any object is built: a file from another scikit-learn version (whose
    trees may not load at all) gets the version message, not "corrupted".

    Parameters
    ----------
    path : Path
        A readable skops file.

    Returns
    -------
    dict
        ``format``, ``format_version`` and ``sklearn_version`` as saved. A key is absent when the
        file does not hold it as a plain value; the checks after loading then judge the file.
    """
    header = {}
    try:
        with zipfile.ZipFile(path) as archive:
            entries = json.loads(archive.read("schema.json"))["content"]
        for key in ("format", "format_version", "sklearn_version"):
            entry = entries.get(key)
            if isinstance(entry, dict) and entry.get("is_json") and isinstance(entry.get("content"), str):
                header[key] = json.loads(entry["content"])
    except Exception:  # zip, JSON, key and type errors alike: what was read so far is kept
        pass
    return header


def _check_versions(path, format_version, sklearn_version):
    """Refuse a classifier file of a newer format or of another scikit-learn version.

    Parameters
    ----------
    path : Path
        The file, for the message.
    format_version : object
        The saved file format version.
    sklearn_version : object
        The saved scikit-learn version.

    Returns
    -------
    str
        The saved scikit-learn version.

    Raises
    ------
    ClassifierFileError
        If the format is newer than this FetalAnnotate reads, or the scikit-learn major.minor
        version differs from the installed one.
    """
    import sklearn

    if not _is_int(format_version) or format_version > FORMAT_VERSION:
        raise ClassifierFileError(f"{path} uses classifier format {format_version}, newer than this FetalAnnotate "
                                  f"reads ({FORMAT_VERSION}); update the FetalAnnotate extension")
    saved_version = str(sklearn_version)
    if _major_minor(saved_version) != _major_minor(sklearn.__version__):
        raise ClassifierFileError(
            f"{path} was trained with scikit-learn {saved_version} but scikit-learn {sklearn.__version__} is "
            f"installed; forests are not portable across scikit-learn versions: retrain from the strokes, or "
            f"install scikit-learn=={saved_version} to apply this file")
    return saved_version


def forest_problem(forest):
    """What makes a loaded forest unsafe or inconsistent to predict with, or None when it is sound.

    scikit-learn follows a tree's stored child and feature indices without bounds checks, so a
    damaged or crafted file could crash the application, hang it, or read memory it does not own
    at the first prediction. Every tree must therefore be one scikit-learn could have grown: its
    ``node_count`` nodes stored, a leaf's children both -1, an inner node's children both later
    nodes (which also rules out loops), an inner node's feature one of the forest's
    ``n_features_in_`` features and its threshold finite, and one finite value per node for one
    output and each of the forest's ``classes_``. A few vectorised checks per tree.

    Parameters
    ----------
    forest : object
        The ``forest`` read from a classifier file (a scikit-learn forest of decision trees).

    Returns
    -------
    str or None
    """
    import numpy as np

    n_features = getattr(forest, "n_features_in_", None)
    if not _is_count(n_features):
        return f"its number of features is {n_features!r}"
    n_outputs = getattr(forest, "n_outputs_", None)
    if not (_is_count(n_outputs) and n_outputs == 1):
        return f"it predicts {n_outputs!r} outputs, not one"
    classes = np.asarray(getattr(forest, "classes_", []))
    if classes.ndim != 1 or classes.size < 1 or not np.issubdtype(classes.dtype, np.integer):
        return f"its classes are {classes.tolist()!r}"
    trees = getattr(forest, "estimators_", None)
    if not isinstance(trees, list) or not trees:
        return "it holds no list of trees"
    for index, estimator in enumerate(trees):
        tree_features = getattr(estimator, "n_features_in_", None)
        if not (_is_count(tree_features) and tree_features == n_features):
            return f"tree {index} takes {tree_features!r} features, not {n_features}"
        try:
            problem = _tree_problem(getattr(estimator, "tree_", None), n_features, classes.size)
        except (TypeError, ValueError) as error:  # arrays of another kind than a tree's
            problem = f"is not a decision tree ({error})"
        if problem:
            return f"tree {index} {problem}"
    return None


def _tree_problem(tree, n_features, n_classes):
    """What is wrong with the node arrays of one fitted ``tree_``, or None (see :func:`forest_problem`)."""
    import numpy as np

    try:
        node_count, capacity = tree.node_count, tree.capacity
    except AttributeError:
        return "is not a decision tree"
    if not (_is_count(node_count) and _is_count(capacity) and node_count <= capacity):
        return f"claims {node_count!r} nodes but stores {capacity!r}"  # its arrays would run past their memory
    left, right = np.asarray(tree.children_left), np.asarray(tree.children_right)
    feature, threshold = np.asarray(tree.feature), np.asarray(tree.threshold)
    value = np.asarray(tree.value)
    if any(array.shape != (node_count,) for array in (left, right, feature, threshold)):
        return f"has node arrays of other lengths than its {node_count} nodes"
    nodes = np.arange(node_count)
    leaf = (left == -1) & (right == -1)
    inner = ~leaf
    bad = inner & ~((left > nodes) & (left < node_count) & (right > nodes) & (right < node_count))
    if bad.any():
        node = int(np.flatnonzero(bad)[0])
        return f"has node {node} with children {int(left[node])} and {int(right[node])} (of {node_count} nodes)"
    bad = inner & ((feature < 0) | (feature >= n_features) | ~np.isfinite(threshold))
    if bad.any():
        node = int(np.flatnonzero(bad)[0])
        return (f"has node {node} splitting feature {int(feature[node])} at {float(threshold[node])} "
                f"(of {n_features} features)")
    if value.shape != (node_count, 1, n_classes):
        return f"has node values of shape {value.shape}, not ({node_count}, 1, {n_classes})"
    if not np.isfinite(value).all():
        return "has node values that are not finite"
    return None


def feature_settings_problem(settings, n_forest_features=None):
    """What is wrong with a classifier's feature settings, or None when they are usable.

    The settings must name a preset of :data:`~FetalAnnotateLib.features.FEATURE_PRESETS`, hold
    only its keys (plus ``n_extra_features``) with values of the preset's types, compute features
    on a small test volume, and give the number of features the forest was trained on.

    Parameters
    ----------
    settings : object
        The settings read from a classifier file.
    n_forest_features : int, optional
        The forest's ``n_features_in_``.

    Returns
    -------
    str or None
    """
    import numpy as np

    from .features import FEATURE_PRESETS, compute_features

    if not isinstance(settings, dict) or settings.get("preset") not in FEATURE_PRESETS:
        preset = settings.get("preset") if isinstance(settings, dict) else settings
        return f"preset {preset!r} is not one of {sorted(FEATURE_PRESETS)}"
    reference = FEATURE_PRESETS[settings["preset"]]
    unknown = sorted(set(settings) - set(reference) - {"n_extra_features"})
    if unknown:
        return f"unknown keys {unknown}"
    for key, value in settings.items():
        problem = _setting_problem(key, value, reference[key]) if key in reference else None
        if problem:
            return problem
    n_extra = settings.get("n_extra_features", 0)
    if not _is_int(n_extra) or n_extra < 0:
        return f"'n_extra_features' is {n_extra!r}, not a count"
    try:  # what the engine does with the settings, on 64 voxels
        features = compute_features(np.arange(64, dtype=np.float32).reshape(4, 4, 4), (1.0, 1.0, 1.0), settings)
    except KeyError as error:
        return f"{error} is missing"
    except (TypeError, ValueError, IndexError) as error:
        return str(error)
    n_features = features.shape[-1] + n_extra
    if n_forest_features is not None and int(n_forest_features) != n_features:
        return f"they give {n_features} features per voxel but the forest was trained on {n_forest_features}"
    return None


def _setting_problem(key, value, expected):
    """What is wrong with one setting, judged by the preset's value for it, or None.

    Sizes and scales above 1000 (mm or voxels) are refused: no fetal image needs them and their
    filter kernels would not fit in memory.
    """
    if isinstance(expected, bool):
        return None if isinstance(value, bool) else f"{key!r} is {value!r}, not true or false"
    if isinstance(expected, (int, float)):
        return None if _is_size(value) else f"{key!r} is {value!r}, not a number in (0, 1000]"
    if isinstance(expected, list):
        if not isinstance(value, list) or not value:
            return f"{key!r} is {value!r}, not a non-empty list"
        if key == "filters":
            return None if all(isinstance(name, str) for name in value) else f"{key!r} is {value!r}, not filter names"
        if key == "normalize_percentiles":
            valid = len(value) == 2 and all(_is_number(v) for v in value) and 0 <= value[0] < value[1] <= 100
            return None if valid else f"{key!r} is {value!r}, not two increasing percentiles in [0, 100]"
        integers = all(_is_int(v) for v in expected)
        valid = all(_is_size(v) and (_is_int(v) or not integers) for v in value)
        return None if valid else f"{key!r} is {value!r}, not {'whole ' if integers else ''}numbers in (0, 1000]"
    return None if value == expected else f"{key!r} is {value!r}, not {expected!r}"


def _is_size(value):
    """True for a number in (0, 1000]."""
    return _is_number(value) and 0 < value <= 1000


def _is_number(value):
    """True for a finite int or float that is not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value):
    """True for an int that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_count(value):
    """True for a positive integer (Python or NumPy) that is not a bool."""
    import numpy as np

    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value > 0


def _major_minor(version):
    """``"1.9.1"`` -> ``(1, 9)``; unparsable versions compare unequal to any real one."""
    parts = version.split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return (version,)
