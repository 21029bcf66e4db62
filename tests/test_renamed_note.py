"""The README lists every renamed flag: every old -> new pair the code accepts (each
`renamed_flags(argv, {...})` table, read from the source, and train.stages.RENAMED_KEYS) is in
the README's "Renamed in this release" table."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("fmvr", "train", "export", "runtime")


def renamed_tables(text: str) -> list[dict[str, str]]:
    """The mappings passed to renamed_flags(...) in one module's source (a dict literal or a
    module-level name bound to one)."""
    tree = ast.parse(text)
    names = {
        t.id: node.value
        for node in tree.body
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict)
        for t in node.targets
        if isinstance(t, ast.Name)
    }
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "renamed_flags":
            table = node.args[1] if len(node.args) > 1 else None
            if isinstance(table, ast.Name):
                table = names.get(table.id)
            assert isinstance(table, ast.Dict), "renamed_flags called with a table this test cannot read"
            out.append(ast.literal_eval(table))
    return out


def code_renames() -> dict[str, set[str]]:
    """old -> {new, ...} over every module."""
    out: dict[str, set[str]] = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            for table in renamed_tables(path.read_text()):
                for old, new in table.items():
                    out.setdefault(old, set()).add(new)
    from train.stages import RENAMED_KEYS

    for old, new in RENAMED_KEYS.items():
        out.setdefault(old, set()).add(new)
    return out


def note() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("## Renamed in this release")
    end = text.index("\n## ", start + 1)
    return text[start:end]


def table_rows(section: str) -> list[tuple[str, str]]:
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 2 and cells[0] not in ("old", "---"):
            rows.append((cells[0], cells[1]))
    return rows


def spelled(cell: str, name: str) -> bool:
    """`name` appears as a word inside one of the cell's code spans."""
    pattern = re.compile(rf"(?<![\w-]){re.escape(name)}(?![\w-])")
    return any(pattern.search(span) for span in re.findall(r"`([^`]*)`", cell))


def test_the_source_reader_finds_the_tables():
    tables = renamed_tables('from x import renamed_flags\nT = {"--a": "--b"}\nrenamed_flags(None, T)\n')
    assert tables == [{"--a": "--b"}]
    renames = code_renames()
    assert {"--llm", "--ckpt", "--budgets", "--question", "budgets"} <= set(renames)


def test_the_table_reader_fails_on_a_missing_row():
    rows = table_rows("| old | new |\n|---|---|\n| `x --a` | `--b` |\n")
    assert any(spelled(o, "--a") and spelled(n, "--b") for o, n in rows)
    assert not any(spelled(o, "--c") for o, _ in rows)


def test_every_renamed_flag_and_key_is_in_the_note():
    rows = table_rows(note())
    missing = [
        f"{old} -> {new}"
        for old, news in sorted(code_renames().items())
        for new in sorted(news)
        if not any(spelled(o, old) and (spelled(n, new) or spelled(o, new)) for o, n in rows)
    ]
    assert missing == [], f"README 'Renamed in this release' lacks {missing}"
