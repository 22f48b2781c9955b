"""README.md stays true: CI runs its test command, and its main command's job works."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands():
    """The shell commands of the README's "Run it on a fresh Linux machine" section, in order."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Run it on a fresh Linux machine", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```(?:bash|sh)\n(.*?)\n```", section, re.S)


def test_readme_has_exactly_two_commands_and_ci_runs_the_test_one():
    commands = readme_commands()
    assert len(commands) == 2
    main_command, test_command = commands
    assert "FetalAnnotateLib demo" in main_command
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()]
    assert test_command in ci_lines


def test_readme_links_and_figures_exist():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    targets = re.findall(r"\]\(([^)#]+)\)", text) + re.findall(r"`((?:Testing|docs)/[\w/.-]+\.\w+)`", text)
    missing = [target for target in targets if not target.startswith("http") and not (ROOT / target).exists()]
    assert targets and missing == []


def test_readme_points_to_the_method_the_figures_and_the_changelog():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    for section in ("## Install in 3D Slicer", "## Install with pip", "## Run it on a fresh Linux machine"):
        assert section in text
    for document in ("docs/user-guide.md", "docs/engine.md", "docs/benchmarks.md", "CHANGELOG.md"):
        assert f"]({document})" in text
