"""Documents: links resolve, notes keep their form, named code exists, no DOMAIN.md."""

import os
import pathlib
import re
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent

# [text](target) and ![alt](target); the target ends at whitespace or ")".
_INLINE_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
# [label]: target
_REFERENCE_LINK = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$", re.M)
_FENCE = re.compile(r"^\s*(```|~~~).*?^\s*\1\s*$", re.M | re.S)
_CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1", re.S)
_HEADING = re.compile(r"^\s{0,3}#{1,6}\s+(.*?)\s*#*\s*$", re.M)
_EXTERNAL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def documents(root=ROOT):
    """README.md, BUILD_NOTES.md, CONTRIBUTING.md (when present), docs/**/*.md."""
    docs = [root / name for name in ("README.md", "BUILD_NOTES.md", "CONTRIBUTING.md")]
    docs = [p for p in docs if p.is_file()]
    return docs + sorted((root / "docs").rglob("*.md"))


def _prose(text):
    """The text without fenced code blocks and code spans (links there are code)."""
    return _CODE_SPAN.sub("", _FENCE.sub("", text))


def heading_anchors(text):
    """GitHub's anchors of a Markdown file's headings ("a-b", "a-b-1", ...)."""
    anchors, seen = set(), {}
    for title in _HEADING.findall(_FENCE.sub("", text)):
        title = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", title)  # link -> text
        slug = re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def broken_links(path):
    """'target: why' for every relative link of `path` that does not resolve."""
    text = pathlib.Path(path).read_text(encoding="utf-8")
    prose = _prose(text)
    targets = _INLINE_LINK.findall(prose) + _REFERENCE_LINK.findall(prose)
    broken = []
    for target in targets:
        if _EXTERNAL.match(target) or target.startswith("//"):
            continue  # http(s)://, mailto: ...: not checked offline
        file_part, _, anchor = target.partition("#")
        linked = pathlib.Path(path)
        if file_part:
            linked = (linked.parent / file_part).resolve()
        if not linked.exists():
            broken.append(f"{target}: no such file or folder")
            continue
        if anchor and linked.is_file() and linked.suffix == ".md":
            anchors = heading_anchors(linked.read_text(encoding="utf-8"))
            if anchor.lower() not in anchors:
                broken.append(f"{target}: no heading with anchor #{anchor}")
    return broken


def test_the_link_checker_finds_broken_links(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "note.md").write_text("# A note\n\n## Why it is so\n")
    readme = tmp_path / "README.md"
    readme.write_text(
        "[ok](docs/note.md) [ok anchor](docs/note.md#why-it-is-so) "
        "[folder](docs/) [web](https://example.com/x.md) [self](#top)\n"
        "# Top\n"
        "[gone](docs/missing.md) ![img](docs/figure.png)\n"
        "[bad anchor](docs/note.md#how)\n"
        "`[in code](docs/absent.md)`\n"
        "```\n[in a fence](docs/absent.md)\n```\n"
        "[ref]: docs/also_missing.md\n"
    )
    assert documents(tmp_path) == [readme, tmp_path / "docs" / "note.md"]
    assert broken_links(readme) == [
        "docs/missing.md: no such file or folder",
        "docs/figure.png: no such file or folder",
        "docs/note.md#how: no heading with anchor #how",
        "docs/also_missing.md: no such file or folder",
    ]


def test_heading_anchors_follow_github():
    text = (
        "# Demo and pipeline runs\n"
        "## Speed: 2 cores, `train_step`\n"
        "## Speed: 2 cores, `train_step`\n"
    )
    assert heading_anchors(text) == {
        "demo-and-pipeline-runs",
        "speed-2-cores-train_step",
        "speed-2-cores-train_step-1",
    }


@pytest.mark.parametrize(
    "path", documents(), ids=lambda p: str(p.relative_to(ROOT))
)
def test_relative_links_resolve(path):
    assert broken_links(path) == [], f"{path.relative_to(ROOT)} has broken links"


def test_the_core_documents_exist():
    names = ("README.md", "BUILD_NOTES.md", "docs/DATA_AND_METRICS.md")
    for name in names + ("docs/RESULTS.md",):
        assert (ROOT / name).is_file(), name
    assert len(list((ROOT / "docs" / "design").glob("*.md"))) >= 16


@pytest.mark.parametrize(
    "path",
    sorted((ROOT / "docs" / "design").glob("*.md")),
    ids=lambda p: p.name,
)
def test_design_notes_say_decision_why_limit(path):
    text = path.read_text(encoding="utf-8").lower()
    missing = [word for word in ("decision", "why", "limit") if word not in text]
    assert not missing, f"{path.name} lacks {missing}"


def test_every_design_note_is_indexed_in_build_notes():
    index = (ROOT / "BUILD_NOTES.md").read_text(encoding="utf-8")
    for note in (ROOT / "docs" / "design").glob("*.md"):
        assert f"docs/design/{note.name}" in index, f"{note.name} is not indexed"


def _tree_files():
    """Tracked and untracked, not ignored, files; a walk when git is absent."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT,
            capture_output=True,
            check=True,
        ).stdout.decode("utf-8", "surrogateescape")
        return [ROOT / name for name in listed.split("\0") if name]
    except (OSError, subprocess.CalledProcessError):
        files = []
        for folder, dirs, names in os.walk(ROOT):
            dirs[:] = [
                d
                for d in dirs
                if not d.startswith(".")
                and d != "__pycache__"
                and not d.endswith(".egg-info")
            ]
            files.extend(pathlib.Path(folder) / n for n in names)
        return files


def test_no_file_cites_domain_md():
    # DOMAIN.md is not in the repository; docs/DATA_AND_METRICS.md is the
    # in-repo account of the data formats and metrics.
    absent = "DOMAIN" + ".md"
    citing = []
    for path in _tree_files():
        relative = path.relative_to(ROOT)
        if relative.parts[0] == "tests" or not path.is_file():
            continue
        if path.stat().st_size > 5_000_000:
            continue
        if absent.encode() in path.read_bytes():
            citing.append(str(relative))
    assert citing == [], f"these files cite {absent}, which is not in the repository"


_CODE_REFERENCE = re.compile(
    r"`((?:[\w/]+/)?\w+\.py):([A-Za-z_]\w*)(?:\.([A-Za-z_]\w*))?`"
)
_SOURCE_DIRS = ("cxr_tf", "pipeline", "serving", "benchmarks")


def stale_code_references(text, root=ROOT):
    """'file.py:name' code spans of `text` whose file or name does not exist.

    A bare file name is looked up under the source folders (it may match
    several files, e.g. cxr_tf/localization.py and cxr_tf/metrics/
    localization.py); the name must be a module-level def, class or
    constant, or `Class.method`.
    """
    stale = []
    for path, name, member in _CODE_REFERENCE.findall(text):
        if "/" in path:
            files = [root / path] if (root / path).is_file() else []
        else:
            files = [f for d in _SOURCE_DIRS for f in (root / d).rglob(path)]
        reference = f"{path}:{name}" + (f".{member}" if member else "")
        if not files:
            stale.append(f"{reference}: no such file")
            continue
        source = "\n".join(f.read_text(encoding="utf-8") for f in files)
        if not re.search(rf"^(?:def|class) {name}\b|^{name}\b\s*[:=]", source, re.M):
            stale.append(f"{reference}: no module-level {name}")
        elif member and not re.search(rf"^\s+def {member}\b", source, re.M):
            stale.append(f"{reference}: no method {member}")
    return stale


def test_stale_code_references_are_found(tmp_path):
    (tmp_path / "cxr_tf" / "metrics").mkdir(parents=True)
    (tmp_path / "cxr_tf" / "metrics" / "m.py").write_text(
        "LIMIT = 3\n\ndef iobb():\n    pass\n\n"
        "class Box:\n    def area(self):\n        pass\n"
    )
    text = (
        "`cxr_tf/metrics/m.py:iobb` `m.py:LIMIT` `m.py:Box.area` "
        "`m.py:iou` `m.py:Box.volume` `cxr_tf/n.py:iobb` `gone.py:f`"
    )
    assert stale_code_references(text, tmp_path) == [
        "m.py:iou: no module-level iou",
        "m.py:Box.volume: no method volume",
        "cxr_tf/n.py:iobb: no such file",
        "gone.py:f: no such file",
    ]


def test_data_and_metrics_names_code_that_exists():
    text = (ROOT / "docs" / "DATA_AND_METRICS.md").read_text(encoding="utf-8")
    assert len(_CODE_REFERENCE.findall(text)) >= 40
    assert stale_code_references(text) == []
