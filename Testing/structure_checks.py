"""Checks of the extension's layout that Slicer's build would otherwise only reveal in Slicer.

Each check takes the repository root and returns a list of problems (empty when all is well),
so the tests can run them both on this checkout and on a deliberately broken copy.
"""

import ast
import json
import re
import xml.etree.ElementTree as ElementTree
from pathlib import Path

MODULES = ("FetalAnnotate", "FetalInpaint")
FORBIDDEN_IN_LIB = {"slicer", "qt", "ctk", "vtk", "vtkmodules", "qSlicerSegmentationsEditorEffectsPythonQt"}
_SET_COMMAND = re.compile(r"set\(\s*(\w+)\s+(.*?)\)", re.S)
_UI_ATTRIBUTE = re.compile(r"\bui\.([A-Za-z_]\w*)")


def cmake_variables(cmake_file):
    """The ``set(NAME values...)`` commands of a CMakeLists.txt as a dict of value lists."""
    text = re.sub(r"(?m)^\s*#.*$", "", Path(cmake_file).read_text(encoding="utf-8"))
    return {name: re.findall(r'"[^"]*"|\S+', body) for name, body in _SET_COMMAND.findall(text)}


def listed_module_files(module_dir):
    """Files the module's CMakeLists.txt lists as scripts and resources, as paths relative to it."""
    variables = cmake_variables(Path(module_dir) / "CMakeLists.txt")
    module_name = variables.get("MODULE_NAME", [Path(module_dir).name])[0]
    listed = []
    for key in ("MODULE_PYTHON_SCRIPTS", "MODULE_PYTHON_RESOURCES"):
        for entry in variables.get(key, []):
            listed.append(entry.strip('"').replace("${MODULE_NAME}", module_name))
    return listed


def module_files_on_disk(module_dir):
    """Python files and resources a module ships (its Testing/ folder and caches excluded)."""
    module_dir = Path(module_dir)
    shipped = []
    for path in sorted(module_dir.rglob("*")):
        relative = path.relative_to(module_dir)
        if not path.is_file() or relative.parts[0] == "Testing" or "__pycache__" in relative.parts:
            continue
        if path.suffix == ".py" or relative.parts[0] == "Resources" or path.suffix == ".png":
            shipped.append(relative.as_posix())
    return shipped


def check_cmake_lists(root):
    """Every listed file exists and every shipped file is listed, for each module."""
    problems = []
    for module in MODULES:
        module_dir = Path(root) / module
        if not (module_dir / "CMakeLists.txt").exists():
            problems.append(f"{module}/CMakeLists.txt is missing")
            continue
        listed = listed_module_files(module_dir)
        problems += [f"{module}/CMakeLists.txt lists {name}, which does not exist"
                     for name in listed if not (module_dir / name).is_file()]
        problems += [f"{module}/{name} is not listed in {module}/CMakeLists.txt"
                     for name in module_files_on_disk(module_dir) if name not in listed]
    return problems


def check_extension_cmake(root):
    """The top-level CMakeLists.txt has the extension template's fields and one subdirectory per module."""
    text = (Path(root) / "CMakeLists.txt").read_text(encoding="utf-8")
    problems = []
    for required in ("project(FetalAnnotate)", "find_package(Slicer REQUIRED)", "include(${Slicer_USE_FILE})",
                     "include(${Slicer_EXTENSION_GENERATE_CONFIG})", "include(${Slicer_EXTENSION_CPACK})"):
        if required not in text:
            problems.append(f"CMakeLists.txt lacks {required}")
    variables = cmake_variables(Path(root) / "CMakeLists.txt")
    for field in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                  "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS", "EXTENSION_DEPENDS"):
        if not variables.get(field):
            problems.append(f"CMakeLists.txt does not set {field}")
    for module in MODULES:
        if f"add_subdirectory({module})" not in text:
            problems.append(f"CMakeLists.txt does not add_subdirectory({module})")
    return problems


def check_catalog_entry(root):
    """``FetalAnnotate.json`` follows the ExtensionsIndex schema and agrees with CMakeLists.txt."""
    entry = json.loads((Path(root) / "FetalAnnotate.json").read_text(encoding="utf-8"))
    variables = cmake_variables(Path(root) / "CMakeLists.txt")
    problems = [f"FetalAnnotate.json lacks {key}" for key in
                ("$schema", "category", "scm_url", "scm_revision", "build_dependencies", "build_subdirectory", "tier")
                if key not in entry]
    depends = [word for value in variables.get("EXTENSION_DEPENDS", []) for word in value.strip('"').split()]
    depends = [] if depends == ["NA"] else depends
    if sorted(entry.get("build_dependencies", [])) != sorted(depends):
        problems.append(f"build_dependencies {entry.get('build_dependencies')} != EXTENSION_DEPENDS {depends}")
    category = " ".join(variables.get("EXTENSION_CATEGORY", [])).strip('"')
    if entry.get("category") != category:
        problems.append(f"category {entry.get('category')!r} != EXTENSION_CATEGORY {category!r}")
    homepage = " ".join(variables.get("EXTENSION_HOMEPAGE", [])).strip('"')
    if not homepage.startswith(entry.get("scm_url", "\0")):
        problems.append(f"EXTENSION_HOMEPAGE {homepage!r} is not on scm_url {entry.get('scm_url')!r}")
    return problems


def ui_object_names(ui_file):
    """Object names of all widgets, layouts and actions in a Qt Designer ``.ui`` file (raises if it does not parse)."""
    tree = ElementTree.parse(ui_file)
    return {element.get("name") for element in tree.iter() if element.tag in ("widget", "layout", "action")
            and element.get("name")}


def check_ui_names(root):
    """Every ``.ui`` parses and every ``ui.<name>`` the module's code uses is an object in its ``.ui``."""
    problems = []
    for module in MODULES:
        module_dir = Path(root) / module
        ui_file = module_dir / "Resources" / "UI" / f"{module}.ui"
        try:
            names = ui_object_names(ui_file)
        except (OSError, ElementTree.ParseError) as error:
            problems.append(f"{ui_file.relative_to(root)} does not parse: {error}")
            continue
        for source in [module_dir / f"{module}.py"]:
            for name in sorted(set(_UI_ATTRIBUTE.findall(source.read_text(encoding="utf-8")))):
                if name not in names:
                    problems.append(f"{source.relative_to(root)} uses ui.{name}, not an object in {ui_file.name}")
    return problems


def imported_top_level_modules(python_file):
    """Top-level package names imported anywhere in a Python file (absolute imports only)."""
    tree = ast.parse(Path(python_file).read_text(encoding="utf-8"), filename=str(python_file))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def check_lib_imports(root):
    """No ``*Lib/`` package imports slicer, qt, ctk or vtk: the numeric cores must run headless."""
    problems = []
    for lib_dir in sorted(Path(root).glob("*/*Lib")):
        for python_file in sorted(lib_dir.rglob("*.py")):
            for name in sorted(imported_top_level_modules(python_file) & FORBIDDEN_IN_LIB):
                problems.append(f"{python_file.relative_to(root)} imports {name}")
    return problems


def check_module_classes(root):
    """Each module file defines the Module, Widget and Test classes and provides the Logic class."""
    problems = []
    for module in MODULES:
        source = Path(root) / module / f"{module}.py"
        tree = ast.parse(source.read_text(encoding="utf-8"), filename=str(source))
        defined = {node.name for node in tree.body if isinstance(node, ast.ClassDef)}
        imported = {alias.asname or alias.name for node in tree.body if isinstance(node, ast.ImportFrom)
                    for alias in node.names}
        for expected in (module, f"{module}Widget", f"{module}Test"):
            if expected not in defined:
                problems.append(f"{source.relative_to(root)} does not define class {expected}")
        if f"{module}Logic" not in defined | imported:
            problems.append(f"{source.relative_to(root)} neither defines nor imports {module}Logic")
    return problems


def _literal_assignments(python_file):
    """Module-level ``name = literal`` assignments and class-level ``name: type = literal`` fields of a file."""
    tree = ast.parse(Path(python_file).read_text(encoding="utf-8"), filename=str(python_file))
    values = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            target, value = node.targets[0].id, node.value
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None:
            target, value = node.target.id, node.value
        else:
            continue
        try:
            values[target] = ast.literal_eval(value)
        except ValueError:
            pass
    return values


def check_python_grammar(root):
    """Every Python file of the extension parses as Python 3.9 (Slicer 5.6 and 5.8) and compiles."""
    problems = []
    for python_file in sorted(Path(root).glob("Fetal*/**/*.py")):
        source = python_file.read_text(encoding="utf-8")
        try:
            compile(ast.parse(source, filename=str(python_file), feature_version=(3, 9)), str(python_file), "exec")
        except SyntaxError as error:
            problems.append(f"{python_file.relative_to(root)}:{error.lineno}: {error.msg}")
    return problems


def bound_widget_names(ui_file):
    """Names of the widgets of a ``.ui`` that the parameter node wrapper writes (``SlicerParameterName``)."""
    tree = ElementTree.parse(ui_file)
    return {widget.get("name") for widget in tree.iter("widget")
            if any(prop.get("name") == "SlicerParameterName" for prop in widget.findall("property"))}


_UI_CONNECTION = re.compile(r"\bui\.([A-Za-z_]\w*)\.(?:connect\(|[A-Za-z_]\w*\.connect\()")


def check_bound_widgets_not_connected(root):
    """No slot is connected by hand to a widget the parameter node wrapper writes.

    The wrapper sets such a widget's value when a scene is loaded or the module is opened, which
    emits its change signal: a slot that does work would then run without any user action.
    """
    problems = []
    for module in MODULES:
        module_dir = Path(root) / module
        bound = bound_widget_names(module_dir / "Resources" / "UI" / f"{module}.ui")
        source = module_dir / f"{module}.py"
        for name in sorted(set(_UI_CONNECTION.findall(source.read_text(encoding="utf-8"))) & bound):
            problems.append(f"{source.relative_to(root)} connects a slot to ui.{name}, which the parameter node "
                            "wrapper writes (SlicerParameterName)")
    return problems


def check_shared_install_folder(root):
    """The modules' scripts and resources have distinct paths: Slicer installs both into one folder."""
    owners = {}
    for module in MODULES:
        for name in listed_module_files(Path(root) / module):
            owners.setdefault(name, []).append(module)
    return [f"{name} is shipped by {' and '.join(modules)}, which install into one folder"
            for name, modules in sorted(owners.items()) if len(modules) > 1]


_CONTRIBUTOR = re.compile(r"^[^()]+ \([^()]+\)$")


def _module_description(source):
    """``{attribute: value node}`` of the ``self.parent.<attribute> = ...`` assignments of a module class."""
    tree = ast.parse(Path(source).read_text(encoding="utf-8"))
    module_class = next(node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == Path(source).stem)
    assignments = {}
    for node in ast.walk(module_class):
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Attribute) and \
                ast.unparse(node.targets[0].value) == "self.parent":
            assignments[node.targets[0].attr] = node.value
    return assignments


def _is_call_of(node, function_name):
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == function_name


def check_module_descriptions(root):
    """Title, help and acknowledgement are translatable (``_()``), categories use ``translate()``, and
    contributors are "Name (Organisation)", as in Slicer's module template."""
    problems = []
    for module in MODULES:
        source = Path(root) / module / f"{module}.py"
        description = _module_description(source)
        where = source.relative_to(root)
        for attribute in ("title", "helpText", "acknowledgementText"):
            if not _is_call_of(description.get(attribute), "_"):
                problems.append(f"{where}: parent.{attribute} is not wrapped in _()")
        categories = description.get("categories")
        if not (isinstance(categories, ast.List) and categories.elts and
                all(_is_call_of(element, "translate") for element in categories.elts)):
            problems.append(f"{where}: parent.categories are not translate(\"qSlicerAbstractCoreModule\", ...)")
        contributors = description.get("contributors")
        names = [element.value for element in getattr(contributors, "elts", [])
                 if isinstance(element, ast.Constant) and isinstance(element.value, str)]
        if not names or any(not _CONTRIBUTOR.match(name) for name in names):
            problems.append(f"{where}: parent.contributors {names} are not all \"Name (Organisation)\"")
    return problems


#: FetalAnnotate panel parameter -> DEFAULT_FOREST key it mirrors.
PANEL_FOREST_PARAMETERS = {"numberOfTrees": "n_estimators", "maxDepth": "max_depth", "minSamplesLeaf": "min_samples_leaf"}


def check_panel_defaults(root):
    """The FetalAnnotate panel's forest, smoothness and memory defaults and preset names are the engine's
    (its copies, so the panel loads before scikit-learn is installed)."""
    panel = _literal_assignments(Path(root) / "FetalAnnotate" / "FetalAnnotate.py")
    engine = _literal_assignments(Path(root) / "FetalAnnotate" / "FetalAnnotateLib" / "engine.py")
    features = _literal_assignments(Path(root) / "FetalAnnotate" / "FetalAnnotateLib" / "features.py")
    problems = []
    for parameter, key in PANEL_FOREST_PARAMETERS.items():
        if panel.get(parameter) != engine["DEFAULT_FOREST"][key]:
            problems.append(f"panel {parameter} = {panel.get(parameter)}, DEFAULT_FOREST[{key!r}] = "
                            f"{engine['DEFAULT_FOREST'][key]}")
    for parameter, constant in (("smoothness", "SMOOTHNESS"), ("memory", "MEMORY")):
        if panel.get(parameter) != engine[constant]:
            problems.append(f"panel {parameter} = {panel.get(parameter)}, {constant} = {engine[constant]}")
    if tuple(panel.get("FEATURE_PRESET_NAMES", ())) != tuple(features["FEATURE_PRESETS"]):
        problems.append(f"FEATURE_PRESET_NAMES {panel.get('FEATURE_PRESET_NAMES')} != FEATURE_PRESETS keys "
                        f"{tuple(features['FEATURE_PRESETS'])}")
    return problems


ALL_CHECKS = (check_cmake_lists, check_extension_cmake, check_catalog_entry, check_ui_names, check_lib_imports,
              check_module_classes, check_panel_defaults, check_python_grammar, check_bound_widgets_not_connected,
              check_shared_install_folder, check_module_descriptions)
