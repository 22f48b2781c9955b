"""Classifier files that are damaged, crafted or from another scikit-learn version are refused at load.

The files are real: a classifier trained on a phantom and saved, then a copy edited inside its
skops archive the way a damaged or crafted file would differ (node arrays, ``schema.json``).
"""

import io
import json
import subprocess
import sys
import textwrap
import warnings
import zipfile

import numpy as np
import pytest

import test_annotate_batch
from conftest import REPOSITORY_ROOT

trained = test_annotate_batch.trained  # the saved phantom classifier fixture, shared
write_image = test_annotate_batch.write_image

DAMAGED = "is damaged or was not written by FetalAnnotate: "
SAVE_AGAIN = "save the classifier again from FetalAnnotate"


def _tree_entries(schema):
    """The ``schema.json`` entries of the saved trees, in the order of the forest's trees."""
    found = []

    def walk(entry):
        if isinstance(entry, dict):
            if entry.get("__loader__") == "TreeNode":
                found.append(entry)
            for value in entry.values():
                walk(value)
        elif isinstance(entry, list):
            for value in entry:
                walk(value)

    walk(schema)
    return found


def rewrite_classifier(source, target, edit_tree=None, edit_schema=None):
    """Copy a ``.skops`` classifier, editing its first tree and/or its schema, as a damaged file would be.

    Parameters
    ----------
    source, target : Path
    edit_tree : callable, optional
        ``edit_tree(tree)`` changes in place ``tree["nodes"]`` (the node records),
        ``tree["values"]``, ``tree["n_classes"]`` (arrays) or ``tree["node_count"]`` (int).
    edit_schema : callable, optional
        ``edit_schema(schema)`` changes the parsed ``schema.json`` in place.

    Returns
    -------
    Path
        ``target``.
    """
    with zipfile.ZipFile(source) as archive:
        files = {info.filename: archive.read(info.filename) for info in archive.infolist()}
    schema = json.loads(files["schema.json"])
    if edit_tree is not None:
        entry = _tree_entries(schema)[0]
        state = entry["content"]["content"]
        names = {"nodes": state["nodes"]["file"], "values": state["values"]["file"],
                 "n_classes": entry["__reduce__"]["args"]["content"][1]["file"]}
        tree = {key: np.load(io.BytesIO(files[name]), allow_pickle=False).copy() for key, name in names.items()}
        tree["node_count"] = json.loads(state["node_count"]["content"])
        edit_tree(tree)
        for key, name in names.items():
            stream = io.BytesIO()
            np.save(stream, tree[key], allow_pickle=False)
            files[name] = stream.getvalue()
        state["node_count"]["content"] = json.dumps(tree["node_count"])
    if edit_schema is not None:
        edit_schema(schema)
    files["schema.json"] = json.dumps(schema).encode()
    with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return target


def set_node(field, value, node=0):
    """An ``edit_tree`` that sets one field of one node record (as the audit's tamper script did)."""
    def edit(tree):
        tree["nodes"][field][node] = value
    return edit


def _last_inner_node(nodes):
    return int(np.flatnonzero(nodes["left_child"] != -1)[-1])


def loop_back_to_the_root(tree):
    """The last inner node's left child becomes the root: a loop a prediction would never leave."""
    tree["nodes"]["left_child"][_last_inner_node(tree["nodes"])] = 0


def half_a_leaf(tree):
    """The last inner node keeps its left child but its right child says "leaf" (-1)."""
    tree["nodes"]["right_child"][_last_inner_node(tree["nodes"])] = -1


def one_more_class(tree):
    """Node values for four classes where the forest has three (the tree's class count edited to match)."""
    tree["n_classes"][:] = tree["n_classes"] + 1
    tree["values"] = np.concatenate([tree["values"], np.zeros(tree["values"].shape[:2] + (1,))], axis=2)


def set_node_count(count):
    """An ``edit_tree`` that changes the saved node count, not the stored nodes."""
    def edit(tree):
        tree["node_count"] = count
    return edit


TAMPERED = {  # name: (edit of the first tree, what the refusal names)
    "left child 2e9 (segfault)": (set_node("left_child", 2_000_000_000), "children 2000000000 and"),
    "feature -2e9 (segfault)": (set_node("feature", -2_000_000_000), "splitting feature -2000000000"),
    "feature 1e8 (reads foreign memory)": (set_node("feature", 100_000_000), "splitting feature 100000000"),
    "feature = n_features": (set_node("feature", 17), "splitting feature 17 at"),
    "root is its own child (hang)": (set_node("right_child", 0), "node 0 with children"),
    "loop back to the root (hang)": (loop_back_to_the_root, "with children 0 and"),
    "right child -1 under an inner node": (half_a_leaf, "and -1"),
    "threshold NaN": (set_node("threshold", np.nan), "at nan"),
    "threshold inf": (set_node("threshold", np.inf), "at inf"),
    "node count 0": (set_node_count(0), "claims 0 nodes but stores"),
    "node count short of the linked nodes": (set_node_count(3), "(of 3 nodes)"),
    "values of four classes": (one_more_class, ", 1, 4), not ("),
}


@pytest.mark.parametrize("name", list(TAMPERED))
def test_a_classifier_with_tampered_trees_is_refused_at_load(trained, tmp_path, name):
    from FetalAnnotateLib.classifier_io import ClassifierFileError, load_classifier

    edit, detail = TAMPERED[name]
    path = trained[0]
    assert trained[1].feature_settings and trained[1].forest.n_features_in_ == 17  # what the edits assume
    bad = rewrite_classifier(path, tmp_path / "tampered.skops", edit_tree=edit)

    with pytest.raises(ClassifierFileError) as error:
        load_classifier(bad)  # loading never predicts: nothing here can crash before the check either

    message = str(error.value)
    assert f"{bad} {DAMAGED}tree 0 " in message and detail in message and message.endswith(SAVE_AGAIN)


def test_a_forest_without_its_feature_count_is_refused(trained, tmp_path):
    """Without ``n_features_in_`` the settings could not be checked against the forest."""
    from FetalAnnotateLib.classifier_io import ClassifierFileError, load_classifier

    def drop_feature_count(schema):
        del schema["content"]["forest"]["content"]["content"]["n_features_in_"]

    bad = rewrite_classifier(trained[0], tmp_path / "no_count.skops", edit_schema=drop_feature_count)

    with pytest.raises(ClassifierFileError, match=f"{DAMAGED}its number of features is None"):
        load_classifier(bad)


def test_applying_a_crashing_classifier_is_a_message_not_a_segfault(trained, tmp_path):
    """The audit's case end to end, in a child process: before the fix it died of SIGSEGV."""
    path, _, second = trained
    bad = rewrite_classifier(path, tmp_path / "child.skops", edit_tree=set_node("left_child", 2_000_000_000))
    write_image(tmp_path / "case.nrrd", second.image, second.spacing)
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(REPOSITORY_ROOT / "FetalAnnotate")!r})
        from FetalAnnotateLib import FetalAnnotateError
        from FetalAnnotateLib.batch import apply_classifier_to_files
        try:
            apply_classifier_to_files({str(bad)!r}, {str(tmp_path / "case.nrrd")!r}, {str(tmp_path / "out")!r})
        except FetalAnnotateError as error:
            print("refused:", error)
        else:
            print("applied")
    """)

    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)

    assert run.returncode == 0, f"the process died ({run.returncode}): {run.stderr[-2000:]}"
    assert run.stdout.startswith(f"refused: {bad} {DAMAGED}tree 0 has node 0 with children 2000000000")
    assert not (tmp_path / "out").exists()


def test_an_untouched_classifier_loads_and_predicts_as_before(trained, tmp_path):
    from FetalAnnotateLib.classifier_io import forest_problem, load_classifier

    path, classifier, second = trained
    copy = rewrite_classifier(path, tmp_path / "copy.skops")  # the rewriting itself changes nothing

    for saved in (load_classifier(path), load_classifier(copy)):
        assert saved.class_names == ("background", "fetus", "placenta") and saved.metadata == {"seed": 1}
        np.testing.assert_array_equal(saved.classifier.predict_proba(second.image, second.spacing),
                                      classifier.predict_proba(second.image, second.spacing))
    assert forest_problem(classifier.forest) is None


def drop_missing_go_to_left(source, target, **saved):
    """A file whose trees do not load here: node records without ``missing_go_to_left``, as scikit-learn 1.2 wrote.

    ``saved`` replaces top-level values of the classifier file (e.g. ``sklearn_version="1.2.2"``).
    """
    def edit_schema(schema):
        for key, value in saved.items():
            schema["content"][key]["content"] = json.dumps(value)

    with zipfile.ZipFile(source) as archive:
        names = [entry["content"]["content"]["nodes"]["file"]
                 for entry in _tree_entries(json.loads(archive.read("schema.json")))]
    rewrite_classifier(source, target, edit_schema=edit_schema)
    with zipfile.ZipFile(target) as archive:
        files = {info.filename: archive.read(info.filename) for info in archive.infolist()}
    for name in names:
        nodes = np.load(io.BytesIO(files[name]), allow_pickle=False)
        kept = [field for field in nodes.dtype.names if field != "missing_go_to_left"]
        stream = io.BytesIO()
        np.save(stream, np.array(nodes[kept].tolist(), dtype=[(field, nodes.dtype[field]) for field in kept]),
                allow_pickle=False)
        files[name] = stream.getvalue()
    with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return target


def test_a_file_from_another_scikit_learn_version_gets_the_version_message_before_loading(trained, tmp_path):
    import skops.io
    import sklearn

    from FetalAnnotateLib.classifier_io import ClassifierFileError, load_classifier

    old = drop_missing_go_to_left(trained[0], tmp_path / "old.skops", sklearn_version="1.2.2")
    with warnings.catch_warnings(), pytest.raises(Exception, match="incompatible dtype"):
        warnings.simplefilter("ignore")  # scikit-learn's own warning about the version
        skops.io.load(old, trusted=["sklearn.tree._tree.Tree"])  # the file does not load in this version

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ClassifierFileError) as error:
            load_classifier(old)

    assert str(error.value) == (
        f"{old} was trained with scikit-learn 1.2.2 but scikit-learn {sklearn.__version__} is installed; forests "
        "are not portable across scikit-learn versions: retrain from the strokes, or install scikit-learn==1.2.2 "
        "to apply this file")
    assert not [warning for warning in caught if "unpickle" in str(warning.message)]  # nothing was loaded


def test_a_newer_file_format_is_told_before_loading(trained, tmp_path):
    from FetalAnnotateLib.classifier_io import ClassifierFileError, load_classifier

    newer = drop_missing_go_to_left(trained[0], tmp_path / "newer.skops", format_version=2)

    with pytest.raises(ClassifierFileError, match="uses classifier format 2, newer than this FetalAnnotate reads "
                                                  r"\(1\); update the FetalAnnotate extension"):
        load_classifier(newer)
