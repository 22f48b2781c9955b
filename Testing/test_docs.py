"""The repository's text stays readable to a newcomer and its version stays consistent.

- No internal milestone words (numbered work sessions, issues or iterations) in any tracked text file:
  code, comments, help texts and docs are read by people who never saw those milestones.
- The newest released version in CHANGELOG.md is the package version in pyproject.toml.
- Every relative link of the Markdown docs points at a file of the checkout.
- Every runtime dependency declared in pyproject.toml is imported by the packages.
"""

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: Internal milestone references. Product words such as ``AnnotationSession``, "session cache"
#: or "the session's features" do not match: a milestone is a number after the word.
MILESTONE_PATTERNS = (
    r"\bsession[- ]\d",
    r"\bsessions? \d",
    r"\bissue #\d",
    r"(?<![\w&])#\d+ ",
    r"\bstop \d",
    r"\bsprint\b",
    r"\breview item\b",
    r"bench-results/s\d+",
)


def tracked_text_files():
    """Paths of the tracked files that are text (binary files hold a NUL byte early on)."""
    try:
        listing = subprocess.run(
            ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
        ).stdout.decode("utf-8")
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the tracked files are unknown")
    paths = []
    for name in filter(None, listing.split("\0")):
        path = ROOT / name
        if path.is_file() and b"\0" not in path.read_bytes()[:8192]:
            paths.append(path)
    return paths


def milestone_hits(paths, root=ROOT):
    """``file:line: text`` (paths relative to ``root``) of every line matching a milestone pattern."""
    pattern = re.compile("|".join(MILESTONE_PATTERNS), re.IGNORECASE)
    hits = []
    for path in paths:
        for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if pattern.search(line):
                hits.append(f"{path.relative_to(root)}:{number}: {line.strip()}")
    return hits


def test_milestone_patterns_find_milestones_and_spare_product_words(tmp_path):
    sample = tmp_path / "sample.md"
    sample.write_text(
        # Built from parts, so that this file itself holds no milestone words.
        "measured in session " + "15\nsee issue #" + "3\nlogs in bench-results/s" + "17/\n"
        "an AnnotationSession keeps its session cache; the session's features\n",
        encoding="utf-8",
    )
    hits = milestone_hits([sample], root=tmp_path)
    assert [hit.split(":")[1] for hit in hits] == ["1", "2", "3"]


def test_no_internal_milestone_words_in_tracked_files():
    paths = tracked_text_files()
    assert paths
    hits = milestone_hits(paths)
    assert hits == [], "internal milestone words (say what changed instead):\n" + "\n".join(hits)


def changelog_released_versions():
    """Version numbers of the released sections of CHANGELOG.md, newest first."""
    text = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    return re.findall(r"^## \[(\d+\.\d+\.\d+)\] - \d{4}-\d{2}-\d{2}$", text, re.MULTILINE)


def pyproject_version():
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    return re.search(r'^version = "([^"]+)"$', text, re.MULTILINE).group(1)


def test_changelog_newest_release_is_the_package_version():
    released = changelog_released_versions()
    assert released, "CHANGELOG.md has no released version section ('## [x.y.z] - YYYY-MM-DD')"
    assert released[0] == pyproject_version()
    assert "## [Unreleased]" in (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")


@pytest.mark.parametrize(
    "document", ["README.md", "CHANGELOG.md", *sorted(f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md"))]
)
def test_relative_links_of_the_docs_exist(document):
    path = ROOT / document
    text = path.read_text(encoding="utf-8")
    targets = [t for t in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text) if not re.match(r"[a-z]+:", t)]
    missing = [t for t in targets if not (path.parent / t).exists()]
    assert missing == []


#: Import names of distributions whose import name is not their project name.
IMPORT_NAMES = {"scikit-learn": "sklearn", "scikit-image": "skimage", "pynrrd": "nrrd"}


def test_every_runtime_dependency_is_imported():
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    block = re.search(r"^dependencies = \[(.*?)^\]", text, re.MULTILINE | re.DOTALL).group(1)
    names = [re.match(r"[A-Za-z0-9_.-]+", entry).group(0) for entry in re.findall(r'"([^"]+)"', block)]
    sources = "\n".join(
        path.read_text(encoding="utf-8")
        for folder in ("FetalAnnotate", "FetalInpaint")
        for path in (ROOT / folder).rglob("*.py")
    )
    unused = [
        name for name in names
        if not re.search(rf"^\s*(?:import|from)\s+{re.escape(IMPORT_NAMES.get(name, name.lower().replace('-', '_')))}\b",
                         sources, re.MULTILINE | re.IGNORECASE)
    ]
    assert unused == [], f"declared in pyproject.toml but imported nowhere: {unused}"


def troubleshooting_messages():
    """The messages quoted in the user guide's Troubleshooting table (first column, in backticks)."""
    text = (ROOT / "docs" / "user-guide.md").read_text(encoding="utf-8")
    section = text.split("## 9. Troubleshooting", 1)[1].split("\n## ", 1)[0]
    rows = [line.split(" | ")[0] for line in section.splitlines() if line.startswith("| `")]
    return [message for row in rows for message in re.findall(r"`([^`]+)`", row)]


def test_troubleshooting_quotes_messages_the_code_prints():
    code = "\n".join(path.read_text(encoding="utf-8") for path in (ROOT / "FetalAnnotate").rglob("*.py"))
    # Join implicitly concatenated string literals ("...; "\n    f"...") as Python does.
    code = re.sub(r"""["']\s*\n\s*f?["']""", "", code)
    messages = troubleshooting_messages()
    assert len(messages) >= 10
    missing = []
    for message in messages:
        for fragment in message.split("…"):
            fragment = fragment.strip(" '\"[]()")
            if len(fragment) >= 10 and fragment not in code:
                missing.append(fragment)
    assert missing == [], "Troubleshooting quotes text the code no longer prints"


REFERENCE_PAPER = "Towards robust fetus segmentation from MRI imaging"


@pytest.mark.parametrize("document", ["README.md", "docs/engine.md", "docs/benchmarks.md", "docs/inpainting.md"])
def test_reference_paper_is_named_with_its_authors(document):
    text = (ROOT / document).read_text(encoding="utf-8")
    assert REFERENCE_PAPER in text
    assert all(author in text for author in ("Lévy", "Godard", "Masson"))


def test_engine_notes_stay_a_description_not_a_history():
    text = (ROOT / "docs" / "engine.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) < 400
    assert text.count("## Tried, not adopted") == 1
