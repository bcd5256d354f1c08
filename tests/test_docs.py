"""The repository stands on its own: every document and image it cites by a relative path
exists inside it, and nothing points at the team's shared folder beside the checkout."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# A cited markdown file (`docs/ALGORITHM.md`, `PRIVACY.md`, `../README.md`) or a relative image
# link in markdown; not a URL or a shell variable (no ":", "//" or "$" before it).
CITED_MD = re.compile(r"(?<![\w./:$-])((?:\.\./)*(?:[\w-]+/)*[A-Z][A-Z_]*\.md)\b")
IMAGE_LINK = re.compile(r"!\[[^\]]*\]\(((?!https?:)[^)\s]+)\)")
# Any relative markdown link, image or not (`[text](../benchmarks/results/current/summary.md#x)`).
RELATIVE_LINK = re.compile(r"\]\(((?!https?:|mailto:|#)[^)\s#]+)(?:#[^)\s]*)?\)")
# A path under benchmarks/ cited in a document, e.g. `benchmarks/results/current/summary.md`. Not a
# placeholder (`<name>.json`, `{cuda,cpu}`, `*`) and not a path inside a git object
# (`research-history-2026-12:benchmarks/...` names the tag's tree, not the checkout's).
CITED_BENCHMARK = re.compile(r"(?<![\w./:$-])(benchmarks/[\w./-]*)(?![\w<{*])")


def tracked_sources() -> list[Path]:
    listed = subprocess.run(["git", "ls-files", "*.py", "*.md", "*.toml", "*.sh"], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout.split()
    return [ROOT / name for name in listed if not name.startswith("benchmarks/results/")]


def resolves(reference: str, cited_in: Path) -> bool:
    """Relative to the citing file, the repository root, or docs/ (comments cite `docs/<NAME>.md` or `<NAME>.md`)."""
    for base in (cited_in.parent, ROOT, ROOT / "docs"):
        target = (base / reference).resolve()
        if target.is_relative_to(ROOT) and target.exists():
            return True
    return False


def test_every_cited_document_and_image_is_in_the_repository() -> None:
    sources = tracked_sources()
    assert len(sources) > 100, "git ls-files found too little: is this a checkout?"
    missing = []
    for path in sources:
        text = path.read_text(errors="replace")
        references = CITED_MD.findall(text)
        if path.suffix == ".md":
            references += IMAGE_LINK.findall(text)
        missing += [f"{path.relative_to(ROOT)}: {ref}" for ref in references if not resolves(ref, path)]
    assert not missing, "cited but not in the repository:\n" + "\n".join(missing)


def test_nothing_points_outside_the_checkout() -> None:
    outside = [f"{p.relative_to(ROOT)}" for p in tracked_sources() if re.search(r"\.\./shared|\bshared/[A-Z]", p.read_text(errors="replace"))]
    assert not outside, outside


def test_every_relative_link_and_benchmark_path_in_the_documents_exists() -> None:
    """Markdown links resolve from the citing file; benchmarks/ paths from the repository root, so
    that removing a grid or its results without updating the documents fails here."""
    missing = []
    for path in tracked_sources():
        if path.suffix != ".md":
            continue
        text = path.read_text(errors="replace")
        for ref in RELATIVE_LINK.findall(text):
            if not (path.parent / ref).resolve().exists():
                missing.append(f"{path.relative_to(ROOT)}: link {ref}")
        for ref in CITED_BENCHMARK.findall(text):
            if not (ROOT / ref.rstrip(".")).exists():
                missing.append(f"{path.relative_to(ROOT)}: {ref}")
    assert not missing, "cited but not in the checkout:\n" + "\n".join(missing)
