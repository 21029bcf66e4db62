"""The documentation holds together: every relative link in README.md, CHANGELOG.md and docs/*.md
points at a file or folder inside the repository (never up with ../, never an absolute path),
every repository path docs/*.md names in code exists, and docs/RESULTS.md is what
scripts/results_doc.py makes of benchmarks/results/*.json."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
CODE = re.compile(r"`[^`\n]*`")
INLINE = re.compile(r"!?\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFDEF = re.compile(r"^\s{0,3}\[[^\]\n]+\]:\s*<?(\S+?)>?(?:\s|$)", re.M)
EXTERNAL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")  # http:, https:, mailto:, ...
TOP = ("fmvr", "train", "export", "runtime", "benchmarks", "dev", "scripts", "tests", "docs")


def docs() -> list[Path]:
    return [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]


def links(text: str) -> list[str]:
    """Link targets in markdown text, outside code blocks and code spans."""
    text = CODE.sub("", FENCE.sub("", text))
    return INLINE.findall(text) + REFDEF.findall(text)


def bad_links(md: Path, root: Path = ROOT) -> list[str]:
    """The relative links of one markdown file that leave the repository or point at nothing."""
    bad = []
    for target in links(md.read_text()):
        if EXTERNAL.match(target) or target.startswith("#"):
            continue
        path = target.split("#", 1)[0].split("?", 1)[0]
        if path.startswith(("/", "../", "..\\")) or path == "..":
            bad.append(f"{md.name}: {target} (leaves the folder or is absolute)")
            continue
        resolved = (md.parent / path).resolve()
        if not resolved.is_relative_to(root.resolve()):
            bad.append(f"{md.name}: {target} (outside the repository)")
        elif not resolved.exists():
            bad.append(f"{md.name}: {target} (no such file or folder)")
    return bad


def named_paths(text: str) -> list[str]:
    """Repository paths named in code spans (`benchmarks/results/x.md`), without globs or placeholders."""
    out = []
    for span in CODE.findall(FENCE.sub("", text)):
        s = span.strip("`").strip()
        if " " in s or any(c in s for c in "<>*{}$"):
            continue
        if s.split("/")[0] in TOP and "/" in s:
            out.append(s.rstrip("/"))
    return out


def results_doc():
    spec = importlib.util.spec_from_file_location("results_doc", ROOT / "scripts" / "results_doc.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


# ---------------------------------------------------------------- the checker itself


def test_link_checker_finds_bad_links_and_passes_good_ones(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "other.md").write_text("x\n")
    (tmp_path / "src").mkdir()
    md = tmp_path / "docs" / "page.md"
    md.write_text(
        "[ok](other.md) [ok dir](../src) [anchor](other.md#part) [web](https://example.org/a.md)\n"
        "[missing](missing.md) [up](../../elsewhere.md) [abs](/etc/passwd)\n"
        "`[not a link](nowhere.md)`\n```\n[in a block](nowhere.md)\n```\n"
        "[ref]: gone.md\n"
    )
    bad = bad_links(md, root=tmp_path)
    assert any("missing.md" in b for b in bad)
    assert any("../../elsewhere.md" in b for b in bad)
    assert any("/etc/passwd" in b for b in bad)
    assert any("gone.md" in b for b in bad)
    assert any("../src" in b for b in bad)  # inside the repository, but written with ../: refused
    assert not any("other.md" in b or "nowhere" in b or "example.org" in b for b in bad)
    assert len(bad) == 5


def test_named_paths_skip_placeholders_and_globs():
    text = "`benchmarks/results/a.md` `profile-<device>.json` `benchmarks/results/runtime_*.md` `python -m x` `dev/`"
    assert named_paths(text) == ["benchmarks/results/a.md", "dev"]


# ---------------------------------------------------------------- the repository's documents


@pytest.mark.parametrize("md", docs(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve_inside_the_repository(md):
    assert md.exists(), md
    assert bad_links(md) == []


def test_the_docs_name_only_paths_that_exist():
    missing = [
        f"{md.name}: {p}"
        for md in sorted((ROOT / "docs").glob("*.md"))
        for p in named_paths(md.read_text())
        if not (ROOT / p).exists()
    ]
    assert missing == []


def test_the_docs_mention_nothing_outside_the_repository():
    for md in [ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = md.read_text()
        assert "../" not in text and "shared/" not in text, md


def test_results_page_is_up_to_date():
    assert results_doc().main(["--check"]) == 0, "run: python scripts/results_doc.py"


def test_results_check_fails_on_a_stale_page_and_passes_after_a_rewrite(tmp_path):
    rd = results_doc()
    results = tmp_path / "results"
    results.mkdir()
    row = {"variant": "ours", "s_per_step": 0.5, "samples_per_s": 8.0, "speedup": 2.0}
    meta = {
        "preset": "tiny",
        "budgets": [36],
        "batch_size": 4,
        "steps": 2,
        "threads": 1,
        "machine": "m",
        "torch": "t",
    }
    (results / "train_speed.json").write_text(json.dumps({"meta": meta, "rows": [row]}))
    page = tmp_path / "RESULTS.md"
    page.write_text("# Results\n\nby hand\n")
    args = ["--out", str(page), "--results", str(results)]
    assert rd.main(["--check", *args]) == 1
    assert rd.main(args) == 0
    assert rd.main(["--check", *args]) == 0
    text = page.read_text()
    assert "| ours | 8.00 | 0.50 | 2.00x |" in text and "Command: not recorded in the JSON." in text
    (results / "train_speed.json").write_text(
        json.dumps({"meta": meta, "rows": [row], "command": "python x"})
    )
    assert rd.main(["--check", *args]) == 1  # the JSON changed: the page is stale again
    rd.main(args)
    assert "Command: `python x`." in page.read_text()
