"""`python -m runtime ask|profile` (in-process main) on copies of the tiny bundle."""

from __future__ import annotations

import json
import shutil

import pytest

from runtime.__main__ import main
from runtime.bundle import BundleError


@pytest.fixture(scope="module")
def bundle(tiny_bundle, tmp_path_factory):
    return shutil.copytree(tiny_bundle, tmp_path_factory.mktemp("cli") / "b")


@pytest.fixture(scope="module")
def image_file(image_bytes, tmp_path_factory):
    p = tmp_path_factory.mktemp("img") / "photo.jpg"
    p.write_bytes(image_bytes[0])
    return str(p)


def ask(bundle, image_file, *flags: str) -> int:
    return main(["ask", "--bundle", str(bundle), "--image", image_file, *flags])


def test_ask_with_a_forced_budget_prints_json(bundle, image_file, capsys):
    rc = ask(
        bundle, image_file, "--prompt", "What is it?", "--tokens", "9", "--max-new-tokens", "3", "--json"
    )
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out[0]["budget"] == 9 and out[0]["backend"] == "ort-cpu"


def test_latency_budget_without_profile_exits_2_and_says_what_to_run(bundle, image_file, capsys):
    rc = ask(bundle, image_file, "--prompt", "hi", "--latency-ms", "50")
    assert rc == 2 and "python -m runtime profile --bundle" in capsys.readouterr().err


def test_profile_then_ask_at_three_latency_budgets(bundle, image_file, capsys):
    assert main(["profile", "--bundle", str(bundle), "--runs", "2", "--warmup", "1"]) == 0
    out = capsys.readouterr().out
    assert "saved" in out and list(bundle.glob("profile-*.json"))
    rc = ask(
        bundle, image_file, "--prompt", "What is it?", "--latency-ms", "0.001", "1e6", "--max-new-tokens", "2"
    )
    out = capsys.readouterr().out
    assert rc == 0
    assert "[latency budget 0.001 ms] -> 1 visual tokens" in out and "MISSED" in out
    assert "[latency budget 1e+06 ms] -> 576 visual tokens" in out


def test_escalate_from_the_cli(bundle, image_file, capsys):
    rc = ask(
        bundle, image_file, "--prompt", "What is it?", "--escalate", "1,36", "--max-new-tokens", "2", "--json"
    )
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and [r["budget"] for r in out] == [1, 36] and out[1]["vision_reused"]


def test_strict_deadline_miss_and_timeout_exit_1(bundle, image_file, capsys):
    rc = ask(
        bundle, image_file, "--prompt", "hi", "--latency-ms", "0.001", "--strict", "--profile-if-missing"
    )
    assert rc == 1 and "no budget fits" in capsys.readouterr().err
    rc = ask(
        bundle, image_file, "--prompt", "hi", "--tokens", "1", "--timeout-s", "0", "--max-new-tokens", "20"
    )
    assert rc == 1 and "timed out" in capsys.readouterr().err


def test_the_old_question_spelling_is_refused(capsys):
    """Nothing was released: `--question` (now --prompt) has no alias (CHANGELOG.md)."""
    with pytest.raises(SystemExit) as e:
        main(["ask", "--bundle", "b", "--image", "i.png", "--prompt", "p", "--question", "What is it?"])
    assert e.value.code == 2 and "--question" in capsys.readouterr().err


def test_help_lists_only_the_new_spelling(capsys):
    with pytest.raises(SystemExit):
        main(["ask", "--help"])
    out = capsys.readouterr().out
    assert "--prompt" in out and "--question" not in out


def test_a_bad_bundle_exits_2(tmp_path, capsys):
    assert main(["ask", "--bundle", str(tmp_path), "--image", "x.jpg", "--prompt", "hi"]) == 2
    assert "no manifest.json" in capsys.readouterr().err


def test_escalation_needs_the_shared_layout(pipe, image_bytes, monkeypatch):
    monkeypatch.setattr(pipe.vision, "shared", False)
    with pytest.raises(BundleError, match="--layout shared"):
        pipe.escalate(image_bytes[0], "hi", budgets=(1, 9))
