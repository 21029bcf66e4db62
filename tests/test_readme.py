"""The READMEs cannot drift from the code: every `python -m ...` command they show names a
module that exists and uses only flags (and subcommands) that module's --help lists."""

from __future__ import annotations

import contextlib
import importlib
import io
import re
import shlex
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ("README.md", "train/README.md", "docs/USAGE.md")
# `python -m mod args` or `torchrun ... -m mod args`, up to the end of the line or code span,
# a pipe, a ; or && chain, or a shell comment
COMMAND = re.compile(r"(?:python3?|torchrun)\b[^`\n]*?\s-m\s+([\w.]+)([^`\n|;#&]*)")
SUBCOMMANDS = {
    "runtime": ("ask", "profile", "serve", "latency", "card"),
    "fmvr.importers": ("llava-hf", "authors"),
}


def readme_commands() -> list[tuple[str, int, str, str]]:
    """(file, line, module, argument text) for every command in the docs."""
    out = []
    for name in DOCS:
        text = (ROOT / name).read_text()
        joined = text.replace("\\\n", " ")  # shell line continuations
        for m in COMMAND.finditer(joined):
            line = joined.count("\n", 0, m.start()) + 1 + text.count("\\\n", 0, m.start())
            out.append((name, line, m.group(1), m.group(2)))
    return out


@cache
def help_flags(module: str, sub: str = "") -> frozenset[str]:
    """Flags listed by `python -m module [sub] --help`, via the module's main(argv)."""
    mod = importlib.import_module(module)
    if hasattr(mod, "__path__"):  # a package: `python -m pkg` runs pkg/__main__.py
        mod = importlib.import_module(module + ".__main__")
    main = mod.main
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), pytest.raises(SystemExit):
        main([sub, "--help"] if sub else ["--help"])
    return frozenset(re.findall(r"(?<![\w-])--[a-z0-9][a-z0-9-]*", buf.getvalue()))


def test_the_docs_show_commands():
    mods = {m for _, _, m, _ in readme_commands()}
    assert {"train", "train.eval", "export", "export.trt", "runtime", "fmvr.flops"} <= mods


@pytest.mark.parametrize("doc,line,module,args", readme_commands(), ids=lambda v: str(v)[:40])
def test_readme_command_uses_listed_flags(doc, line, module, args):
    words = shlex.split(args.strip(), comments=True) if args.strip() else []
    subs = SUBCOMMANDS.get(module, ())
    sub = words[0] if subs and words and not words[0].startswith("-") else ""
    for s in sub.split("/") if sub else ():
        assert s in subs, f"{doc}:{line}: `python -m {module} {s}`: no such subcommand (has {subs})"
    if "/" in sub:  # a list of subcommands in prose ("ask/profile/serve"): no flags to check
        return
    flags = {w.split("=")[0] for w in words if w.startswith("--")}
    unknown = sorted(flags - help_flags(module, sub))
    assert not unknown, f"{doc}:{line}: `python -m {module} {sub}` does not accept {unknown} (see its --help)"
