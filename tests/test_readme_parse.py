"""The README's commands all run as written: beyond tests/test_readme.py (flag names
against --help), every `python -m ...` command in the READMEs is parsed by its module's own
argparse parser (choices, types, required flags, subcommands) without a deprecation warning.
Parsing is intercepted at the outermost parse, so nothing runs."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import shlex
import warnings

import pytest

from tests.test_readme import readme_commands

PLACEHOLDERS = ("<", "...")  # "<same flags> --resume", "python -m train ..."


class Parsed(Exception):
    pass


@contextlib.contextmanager
def parse_only(monkeypatch):
    """Raise Parsed once the outermost parse_args / parse_known_args succeeds."""
    depth = [0]

    def wrap(real):
        def method(self, *a, **kw):
            depth[0] += 1
            try:
                result = real(self, *a, **kw)
            finally:
                depth[0] -= 1
            if depth[0] == 0:
                raise Parsed(result)
            return result

        return method

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", wrap(argparse.ArgumentParser.parse_args))
    monkeypatch.setattr(
        argparse.ArgumentParser, "parse_known_args", wrap(argparse.ArgumentParser.parse_known_args)
    )
    yield


def module_main(module: str):
    mod = importlib.import_module(module)
    if hasattr(mod, "__path__"):
        mod = importlib.import_module(module + ".__main__")
    return mod.main


def parse(monkeypatch, module: str, argv: list[str]) -> tuple[str, list[str]]:
    """(outcome, deprecation messages): outcome "ok" or the parser's error text."""
    err = io.StringIO()
    with warnings.catch_warnings(record=True) as seen, parse_only(monkeypatch):
        warnings.simplefilter("always")
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                module_main(module)(argv)
        except Parsed:
            outcome = "ok"
        except SystemExit as e:  # --help exits 0 after printing
            outcome = "ok" if e.code == 0 and "--help" in argv else f"exit {e.code}: {err.getvalue().strip()}"
        else:
            outcome = "main returned without parsing"
    deprecations = [
        str(w.message) for w in seen if issubclass(w.category, (FutureWarning, DeprecationWarning))
    ]
    return outcome, deprecations


def runnable_commands():
    out = []
    for doc, line, module, args in readme_commands():
        text = args.strip()
        if not text or any(p in text for p in PLACEHOLDERS):
            continue  # a list of module names in prose, or a placeholder
        words = shlex.split(text, comments=True)
        if words and "/" in words[0]:
            continue  # "ask/profile/serve/bench" in prose
        if module == "runtime.ros" and "--ros-args" in words:
            words = words[: words.index("--ros-args")]  # ROS arguments go to rclpy, not argparse
        out.append(pytest.param(module, words, id=f"{doc}:{line}:{module}"))
    return out


def test_the_harness_catches_bad_values_and_old_spellings(monkeypatch):
    assert parse(monkeypatch, "export", ["--checkpoint", "c", "--quant", "int8"]) == ("ok", [])
    outcome, _ = parse(monkeypatch, "export", ["--checkpoint", "c", "--quant", "int9"])
    assert outcome.startswith("exit 2") and "invalid choice" in outcome
    outcome, _ = parse(monkeypatch, "export.trt", ["--bundle", "b", "--max-batch", "many"])
    assert outcome.startswith("exit 2") and "--max-batch" in outcome
    outcome, _ = parse(monkeypatch, "export", ["--checkpoint", "c", "--llm", "int8"])
    assert outcome.startswith("exit 2") and "--llm" in outcome


def test_there_are_commands_to_parse():
    assert len(runnable_commands()) >= 20


@pytest.mark.parametrize(("module", "argv"), runnable_commands())
def test_readme_command_parses_as_written(monkeypatch, module, argv):
    outcome, deprecations = parse(monkeypatch, module, argv)
    assert outcome == "ok", f"python -m {module} {shlex.join(argv)}: {outcome}"
    assert deprecations == [], f"python -m {module} {shlex.join(argv)} uses an old spelling: {deprecations}"
