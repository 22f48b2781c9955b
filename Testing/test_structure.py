"""The extension's layout: CMake lists, .ui names, catalog entry, headless Lib packages.

Each check runs on this checkout (it must find nothing) and on a copy broken on purpose (it
must find exactly that breakage), so a check that can never fail would fail here.
"""

import shutil
from pathlib import Path

import pytest

import structure_checks as checks

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("check", checks.ALL_CHECKS, ids=lambda check: check.__name__)
def test_checkout_passes(check):
    assert check(ROOT) == []


def rewrite(path, change):
    """Replace a file's text by ``change(text)``."""
    path.write_text(change(path.read_text(encoding="utf-8")), encoding="utf-8")


@pytest.fixture
def broken_copy(tmp_path):
    """A copy of the files the checks read, to break on purpose."""
    copy = tmp_path / "extension"
    for name in ("CMakeLists.txt", "FetalAnnotate.json", *checks.MODULES):
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, copy / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            copy.mkdir(exist_ok=True)
            shutil.copy(source, copy / name)
    return copy


def test_removed_listed_file_is_reported(broken_copy):
    listed = checks.listed_module_files(broken_copy / "FetalAnnotate")
    victim = next(name for name in listed if name.endswith(".py") and "/" in name)
    (broken_copy / "FetalAnnotate" / victim).unlink()
    assert checks.check_cmake_lists(broken_copy) == [
        f"FetalAnnotate/CMakeLists.txt lists {victim}, which does not exist"]


def test_unlisted_module_file_is_reported(broken_copy):
    (broken_copy / "FetalInpaint" / "FetalInpaintLib" / "forgotten.py").write_text("", encoding="utf-8")
    assert checks.check_cmake_lists(broken_copy) == [
        "FetalInpaint/FetalInpaintLib/forgotten.py is not listed in FetalInpaint/CMakeLists.txt"]


def test_misspelled_ui_name_is_reported(broken_copy):
    ui_file = broken_copy / "FetalAnnotate" / "Resources" / "UI" / "FetalAnnotate.ui"
    module_code = (broken_copy / "FetalAnnotate" / "FetalAnnotate.py").read_text(encoding="utf-8")
    name = sorted(set(checks._UI_ATTRIBUTE.findall(module_code)))[0]
    rewrite(ui_file, lambda text: text.replace(f'name="{name}"', f'name="{name}Typo"'))
    assert checks.check_ui_names(broken_copy) == [
        f"FetalAnnotate/FetalAnnotate.py uses ui.{name}, not an object in FetalAnnotate.ui"]


def test_unparsable_ui_is_reported(broken_copy):
    ui_file = broken_copy / "FetalInpaint" / "Resources" / "UI" / "FetalInpaint.ui"
    rewrite(ui_file, lambda text: text[:-40])
    problems = checks.check_ui_names(broken_copy)
    assert len(problems) == 1 and "does not parse" in problems[0]


def test_slicer_import_in_lib_is_reported(broken_copy):
    lib_file = broken_copy / "FetalAnnotate" / "FetalAnnotateLib" / "phantom.py"
    rewrite(lib_file, lambda text: text + "\n\ndef _late():\n    import qt.QtCore\n    from vtk import vtkImageData\n")
    assert checks.check_lib_imports(broken_copy) == [
        "FetalAnnotate/FetalAnnotateLib/phantom.py imports qt",
        "FetalAnnotate/FetalAnnotateLib/phantom.py imports vtk",
    ]


def test_catalog_disagreeing_with_cmake_is_reported(broken_copy):
    catalog = broken_copy / "FetalAnnotate.json"
    rewrite(catalog, lambda text: text.replace('"PyTorch"', '"MONAIAuto3DSeg"'))
    assert checks.check_catalog_entry(broken_copy) == [
        "build_dependencies ['MONAIAuto3DSeg'] != EXTENSION_DEPENDS ['PyTorch']"]


def test_missing_module_class_is_reported(broken_copy):
    module_file = broken_copy / "FetalInpaint" / "FetalInpaint.py"
    rewrite(module_file, lambda text: text.replace("class FetalInpaintTest(", "class FetalInpaintTests("))
    assert checks.check_module_classes(broken_copy) == [
        "FetalInpaint/FetalInpaint.py does not define class FetalInpaintTest"]


def test_panel_default_disagreeing_with_engine_is_reported(broken_copy):
    module_file = broken_copy / "FetalAnnotate" / "FetalAnnotate.py"
    rewrite(module_file, lambda text: text.replace("WithinRange(1, 100)] = 16", "WithinRange(1, 100)] = 12"))
    assert checks.check_panel_defaults(broken_copy) == ["panel maxDepth = 12, DEFAULT_FOREST['max_depth'] = 16"]


@pytest.mark.parametrize("default, changed, problem", [
    ("WithinRange(0.0, 20.0)] = 3.0", "WithinRange(0.0, 20.0)] = 1.0", "panel smoothness = 1.0, SMOOTHNESS = 3.0"),
    ("WithinRange(0.0, 0.9)] = 0.7", "WithinRange(0.0, 0.9)] = 0.3", "panel memory = 0.3, MEMORY = 0.7"),
])
def test_panel_smoothness_or_memory_disagreeing_with_engine_is_reported(broken_copy, default, changed, problem):
    module_file = broken_copy / "FetalAnnotate" / "FetalAnnotate.py"
    rewrite(module_file, lambda text: text.replace(default, changed))
    assert checks.check_panel_defaults(broken_copy) == [problem]


@pytest.mark.parametrize("code, message", [
    ("match value:\n    case 1:\n        pass\n", "only supported in Python 3.10"),
    ("def late():\n    pass\nreturn 1\n", "'return' outside function"),
])
def test_python_310_syntax_or_compile_error_is_reported(broken_copy, code, message):
    effect = broken_copy / "FetalAnnotate" / "SegmentEditorRandomForest" / "SegmentEditorEffect.py"
    rewrite(effect, lambda text: text + "\n\nvalue = 1\n" + code)
    problems = checks.check_python_grammar(broken_copy)
    assert len(problems) == 1 and problems[0].startswith(
        "FetalAnnotate/SegmentEditorRandomForest/SegmentEditorEffect.py:") and message in problems[0]


def test_slot_on_widget_written_by_parameter_node_is_reported(broken_copy):
    ui_file = broken_copy / "FetalAnnotate" / "Resources" / "UI" / "FetalAnnotate.ui"
    rewrite(ui_file, lambda text: text.replace(
        '<widget class="ctkSliderWidget" name="thresholdSlider">',
        '<widget class="ctkSliderWidget" name="thresholdSlider"><property name="SlicerParameterName" stdset="0">'
        "<string>threshold</string></property>"))
    assert checks.check_bound_widgets_not_connected(broken_copy) == [
        "FetalAnnotate/FetalAnnotate.py connects a slot to ui.thresholdSlider, which the parameter node wrapper "
        "writes (SlicerParameterName)"]


def test_resource_shipped_by_both_modules_is_reported(broken_copy):
    for module in checks.MODULES:
        (broken_copy / module / "Resources" / "requirements.txt").write_text("numpy\n", encoding="utf-8")
        rewrite(broken_copy / module / "CMakeLists.txt", lambda text: text.replace(
            "set(MODULE_PYTHON_RESOURCES\n", "set(MODULE_PYTHON_RESOURCES\n  Resources/requirements.txt\n"))
    assert checks.check_shared_install_folder(broken_copy) == [
        "Resources/requirements.txt is shipped by FetalAnnotate and FetalInpaint, which install into one folder"]


def test_untranslated_or_unattributed_module_description_is_reported(broken_copy):
    module_file = broken_copy / "FetalInpaint" / "FetalInpaint.py"
    rewrite(module_file, lambda text: text.replace('self.parent.title = _("Fetal Inpaint")',
                                                   'self.parent.title = "Fetal Inpaint"').replace(
        '["FetalAnnotate developers (FetalAnnotate project)"]', '["FetalAnnotate developers"]'))
    assert checks.check_module_descriptions(broken_copy) == [
        "FetalInpaint/FetalInpaint.py: parent.title is not wrapped in _()",
        "FetalInpaint/FetalInpaint.py: parent.contributors ['FetalAnnotate developers'] are not all "
        '"Name (Organisation)"',
    ]
