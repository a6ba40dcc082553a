"""No file of the repository cites a document that the repository does not contain: every `NAME.md` (and
`NAME.md §N`) mentioned in code, configs, tests and docs resolves to a tracked file (from the repository root
or the citing file's folder), and every `docs/methods.md §N` to a section `## N.` of that file."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CITATION = re.compile(r"(?<![\w/.:-])((?:\.\./|\./)?\w[\w./-]*\.md)\b(?:\s*§\s*(\d+))?")
#: markdown files the drivers WRITE into a run's output folder (evaluate.py, ablate.py, compare.py): outputs, not
#: citations
OUTPUTS = {"sweep.md", "ablation.md", "leaderboard.md"}
TEXT = (".py", ".md", ".yaml", ".yml", ".toml", ".txt", ".cfg", ".ini", "")


def tracked_files() -> list[Path]:
    names = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split()
    return [REPO / n for n in names if Path(n).suffix in TEXT and (REPO / n).is_file()]


def citations(text: str) -> list[tuple[str, str | None]]:
    return [(m.group(1), m.group(2)) for m in CITATION.finditer(text)]


def test_the_pattern_finds_citations():
    found = citations("see docs/methods.md §6 and ../notes/x.md; README.md, http://x.org/a/b.md")
    assert found == [("docs/methods.md", "6"), ("../notes/x.md", None), ("README.md", None)]


def test_every_cited_document_exists():
    sections = set(re.findall(r"^## (\d+)\.", (REPO / "docs" / "methods.md").read_text(), flags=re.M))
    missing = []
    for path in tracked_files():
        if path == Path(__file__).resolve():
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        for cited, section in citations(text):
            if Path(cited).name in OUTPUTS:
                continue
            target = next((p for p in (REPO / cited, path.parent / cited) if p.resolve().is_file()), None)
            inside = target is not None and REPO in target.resolve().parents
            if not inside:
                missing.append(f"{path.relative_to(REPO)}: {cited}")
            elif section and target.resolve() == (REPO / "docs" / "methods.md") and section not in sections:
                missing.append(f"{path.relative_to(REPO)}: {cited} §{section} (no section {section})")
    assert not missing, "citations of documents the repository does not contain:\n" + "\n".join(missing)
