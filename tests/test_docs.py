"""The repository explains itself: its citations point at docs/theory.md, whose sections exist,
and nothing points at documents outside the repository (pure file reading, no imports of the
library)."""
from __future__ import annotations

import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
THEORY = os.path.join(ROOT, "docs", "theory.md")
SCANNED = ("ntk_jax", "experiments", "configs", "benchmarks", "notebooks", "docs", "tests", "README.md", "setup.py")
TEXT_SUFFIXES = (".py", ".md", ".txt", ".ini", ".cfg", ".toml", ".yaml", ".yml", ".json", ".sh", ".ipynb")
THIS = os.path.abspath(__file__)

# Built from pieces so that this file does not match its own patterns.
OLD_DOC_WORD = re.compile(r"\b" + "SP" + "EC" + r"\b")
OUTSIDE = [re.compile(p) for p in (r"\.\./+" + "shared", "/work/" + "shared", "shared" + r"\s+folder")]
SECTION = r"§(\d+(?:\.\d+)*)"
# "docs/theory.md §6.1", "docs/theory.md §1, §2", "docs/theory.md §6.1/§6.2", "§3.1–§3.4"
CITATION = re.compile(r"docs/theory\.md((?:\s*(?:,|/|–|-|and)?\s*§\d+(?:\.\d+)*)+)")
HEADING = re.compile(r"^#{2,6}\s+(\d+(?:\.\d+)*)\.?\s", re.M)
MD_LINK = re.compile(r"\]\(([^)\s]+)\)")
OTHER_DOC_SECTION = re.compile(r"[\w./-]+\.md\s+§\d+(?:\.\d+)*")


def scanned_files():
    for entry in SCANNED:
        path = os.path.join(ROOT, entry)
        if os.path.isfile(path):
            yield path
            continue
        for dirpath, dirnames, filenames in os.walk(path):
            dirnames[:] = [d for d in dirnames if d != "__pycache__" and not d.startswith(".")]
            for name in sorted(filenames):
                if name.endswith(TEXT_SUFFIXES):
                    yield os.path.join(dirpath, name)


def read(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as fh:
        return fh.read()


def rel(path: str) -> str:
    return os.path.relpath(path, ROOT)


def line_of(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def theory_sections() -> set[str]:
    return set(HEADING.findall(read(THEORY)))


def test_theory_exists_with_numbered_sections():
    sections = theory_sections()
    headings = HEADING.findall(read(THEORY))
    assert len(headings) == len(sections), "docs/theory.md has a section number twice"
    for top in map(str, range(1, 9)):
        assert top in sections, f"docs/theory.md lacks section {top}"
    # every subsection sits under a section that exists
    for s in sections:
        if "." in s:
            assert s.rsplit(".", 1)[0] in sections, f"§{s} has no parent section"


def test_no_citation_of_documents_outside_the_repository():
    problems = []
    for path in scanned_files():
        if os.path.abspath(path) == THIS:
            continue
        text = read(path)
        for pattern in [OLD_DOC_WORD, *OUTSIDE]:
            for m in pattern.finditer(text):
                problems.append(f"{rel(path)}:{line_of(text, m.start())}: {m.group(0)!r}")
    assert not problems, "references to documents outside the repository:\n" + "\n".join(problems)


def test_markdown_links_stay_inside_the_repository():
    problems = []
    for path in scanned_files():
        if not path.endswith(".md"):
            continue
        text = read(path)
        for m in MD_LINK.finditer(text):
            target = m.group(1).split("#", 1)[0]
            if not target or re.match(r"^[a-z][a-z0-9+.-]*:", target):  # anchors, URLs
                continue
            resolved = os.path.normpath(os.path.join(os.path.dirname(path), target))
            if os.path.commonpath([resolved, ROOT]) != ROOT:
                problems.append(f"{rel(path)}:{line_of(text, m.start())}: {target} leaves the repository")
            elif not os.path.exists(resolved):
                problems.append(f"{rel(path)}:{line_of(text, m.start())}: {target} does not exist")
    assert not problems, "\n".join(problems)


def test_every_cited_section_exists():
    sections = theory_sections()
    missing, count = [], 0
    for path in scanned_files():
        text = read(path)
        for m in CITATION.finditer(text):
            for s in re.findall(SECTION, m.group(1)):
                count += 1
                if s not in sections:
                    missing.append(f"{rel(path)}:{line_of(text, m.start())}: docs/theory.md §{s}")
    assert count >= 100, f"only {count} citations of docs/theory.md found: is the pattern broken?"
    assert not missing, "cited sections missing from docs/theory.md:\n" + "\n".join(missing)


def test_theory_internal_references_exist():
    text = read(THEORY)
    sections = theory_sections()
    own = OTHER_DOC_SECTION.sub(lambda m: m.group(0) if m.group(0).startswith("docs/theory.md") else "", text)
    missing = sorted({s for s in re.findall(SECTION, own) if s not in sections})
    assert not missing, f"docs/theory.md refers to sections it does not have: {missing}"


@pytest.mark.parametrize("name", ["README.md", os.path.join("docs", "README.md")])
def test_indexes_link_theory(name):
    text = read(os.path.join(ROOT, name))
    assert re.search(r"\]\((?:docs/)?theory\.md\)", text), f"{name} does not link docs/theory.md"
