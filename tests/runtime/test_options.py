"""AskOptions: one typed set of options, checked with errors that name the option."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest

from runtime.__main__ import main
from runtime.options import AskOptions, OptionsError


def test_defaults_and_normalisation():
    assert dataclasses.asdict(AskOptions()) == {
        "latency_ms": None,
        "tokens": None,
        "objective": "ttft",
        "strict": False,
        "max_new_tokens": 64,
        "temperature": 0.0,
        "top_p": 1.0,
        "seed": None,
        "stop": (),
        "timeout_s": None,
    }
    with pytest.raises(TypeError):
        AskOptions(120)  # keyword-only: a bare number is not silently a latency budget
    o = AskOptions(latency_ms=120, tokens=np.int64(36), temperature=1, top_p=1, stop="END", timeout_s=5)
    assert (o.latency_ms, o.tokens, o.temperature, o.stop, o.timeout_s) == (120.0, 36, 1.0, ("END",), 5.0)
    assert type(o.latency_ms) is float and type(o.tokens) is int
    assert AskOptions(stop=["a", "b"]).stop == ("a", "b")
    assert AskOptions(latency_ms=120) == AskOptions(latency_ms=120.0)  # equal whoever built them


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("latency_ms", 0, "latency_ms must be > 0 ms"),
        ("latency_ms", -5, "latency_ms must be > 0 ms"),
        ("latency_ms", float("nan"), "latency_ms must be a finite number"),
        ("latency_ms", "120", "latency_ms must be a finite number"),
        ("tokens", 0, "tokens must be a visual-token budget >= 1"),
        ("tokens", 9.5, "tokens must be an integer"),
        ("tokens", True, "tokens must be an integer"),
        ("objective", "fast", "objective must be one of ttft, total"),
        ("strict", "yes", "strict must be true or false"),
        ("max_new_tokens", 0, "max_new_tokens must be >= 1"),
        ("temperature", -0.1, "temperature must be >= 0"),
        ("top_p", 0.0, r"top_p must be in \(0, 1\]"),
        ("top_p", 1.5, r"top_p must be in \(0, 1\]"),
        ("seed", -1, "seed must be in"),
        ("stop", [""], "stop must be a string or a list of non-empty strings"),
        ("stop", 5, "stop must be a string"),
        ("timeout_s", -1, "timeout_s must be >= 0 s"),
    ],
)
def test_bad_values_name_the_option(field, value, match):
    with pytest.raises(OptionsError, match=match) as e:
        AskOptions(**{field: value})
    assert e.value.field == field and isinstance(e.value, ValueError)


def test_of_replaces_fields_and_refuses_unknown_names():
    base = AskOptions(tokens=9, max_new_tokens=2)
    assert AskOptions.of(base, max_new_tokens=3) == AskOptions(tokens=9, max_new_tokens=3)
    assert AskOptions.of(base) is base and AskOptions.of() == AskOptions()
    with pytest.raises(TypeError, match=r"visual_tokens \(did you mean tokens\?\)"):
        AskOptions.of(visual_tokens=9)
    with pytest.raises(TypeError, match=r"latency_sm \(did you mean latency_ms\?\).*the options are"):
        AskOptions.of(latency_sm=9)
    with pytest.raises(TypeError, match="pass latency_ms=..., tokens=... etc. by keyword"):
        AskOptions.of(120)  # the old positional latency_ms
    with pytest.raises(OptionsError, match="top_p"):
        AskOptions.of(base, top_p=2)


def test_pipeline_refuses_bad_options_and_positional_numbers(pipe, image_bytes):
    with pytest.raises(OptionsError, match="latency_ms must be > 0"):
        pipe.ask(image_bytes[0], "hi", latency_ms=-1)
    with pytest.raises(TypeError, match="by keyword"):
        pipe.ask(image_bytes[0], "hi", 120)
    with pytest.raises(OptionsError, match="latency_ms does not apply to escalate"):
        pipe.escalate(image_bytes[0], "hi", budgets=(1, 9), latency_ms=50)


def test_an_options_object_and_keywords_combine(pipe, image_bytes):
    opts = AskOptions(tokens=9, max_new_tokens=2)
    r = pipe.ask(image_bytes[0], "What is it?", opts, max_new_tokens=3)
    assert r.budget == 9 and len(r.token_ids) <= 3
    assert r.token_ids == pipe.ask(image_bytes[0], "What is it?", tokens=9, max_new_tokens=3).token_ids


@pytest.mark.parametrize(
    ("flags", "match"),
    [
        (["--top-p", "2"], r"--top-p must be in \(0, 1\]"),
        (["--latency-ms", "0"], "--latency-ms must be > 0 ms"),
        (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
        (["--escalate", "1,9", "--latency-ms", "50"], "--escalate answers at the budgets it lists"),
        (["--escalate", "1,x"], "give comma-separated budgets"),
    ],
)
def test_cli_checks_options_before_loading_the_bundle(tmp_path, capsys, flags, match):
    missing = tmp_path / "no-bundle"  # never read: the flags are refused first
    with pytest.raises(SystemExit) as e:
        main(["ask", "--bundle", str(missing), "--image", "x.jpg", "--prompt", "hi", *flags])
    assert e.value.code == 2
    assert re.search(match, capsys.readouterr().err)
