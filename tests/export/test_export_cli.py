"""The export command lines: one set of argument groups, options records, no old spellings."""

from __future__ import annotations

import shlex

import pytest

from export.common import ExportError
from export.options import LLMOptions, VisionOptions, options_from_build, rebuild_command


@pytest.fixture
def captured(monkeypatch):
    """build_bundle replaced by a recorder: what the command asked for, without exporting."""
    import export.build as eb

    calls = []

    def fake_build_bundle(src, out, **kw):
        calls.append(kw)
        raise ExportError("recorded")

    monkeypatch.setattr(eb, "build_bundle", fake_build_bundle)
    return calls


def test_the_old_llm_flag_is_refused(captured, tmp_path, capsys):
    from export.cli import export_main

    with pytest.raises(SystemExit) as e:
        export_main(["--demo-tiny", "--out", str(tmp_path / "b"), "--llm", "int4"])
    assert e.value.code == 2 and "--llm" in capsys.readouterr().err and not captured


def test_quant_flag_builds_the_options_once(captured, tmp_path):
    from export.cli import export_main

    args = ["--demo-tiny", "--out", str(tmp_path / "b"), "--tokens", "36,9", "--layout", "per-budget"]
    args += ["--fp16", "--opset", "19", "--quant", "int4", "--target", "cuda", "--block-size", "64"]
    assert export_main(args) == 2
    kw = captured[-1]
    assert kw["tokens"] == (36, 9)
    assert kw["vision"] == VisionOptions(layout="per-budget", precision="fp16", opset=19)
    assert kw["llm"] == LLMOptions(quant="int4", target="cuda", exporter="auto", block_size=64)


def test_build_tiny_bundle_takes_quant_and_no_old_keyword(tmp_path):
    from export import build_tiny_bundle

    with pytest.raises(TypeError, match="llm"):
        build_tiny_bundle(tmp_path, llm="int8")


def test_options_refuse_what_will_not_run():
    with pytest.raises(ExportError, match="--quant fp16 needs --target cuda.*CPU provider lacks fp16"):
        LLMOptions(quant="fp16", target="cpu")
    with pytest.raises(
        ExportError, match="--quant int8 needs --target cpu.*for --target cuda use int4, fp16 or fp32"
    ):
        LLMOptions(quant="int8", target="cuda")
    with pytest.raises(ExportError, match="power of two"):
        LLMOptions(block_size=24)
    with pytest.raises(ExportError, match="--exporter dynamo"):
        LLMOptions(quant="fp32", exporter="genai").exporter_for("gpt_neox")
    assert LLMOptions(quant="int4").exporter_for("gpt_neox") == "dynamo"
    assert LLMOptions(quant="int4", target="cuda").exporter_for("qwen2") == "genai"
    with pytest.raises(ExportError, match="--layout"):
        VisionOptions(layout="tiled")


def test_rebuild_command_is_generated_from_the_options_and_parses_back():
    from export.cli import export_parser, llm_options, vision_options

    vision, llm = VisionOptions("per-budget", "fp16", 19), LLMOptions("int4", "cuda", "dynamo", 64)
    cmd = rebuild_command(["--checkpoint", "runs/my ckpt"], "out dir", (36, 1), vision, llm)
    argv = shlex.split(cmd)
    assert argv[:3] == ["python", "-m", "export"] and argv[-1] == "--force"
    args = export_parser().parse_args(argv[3:])
    assert (args.checkpoint, args.out, args.tokens) == ("runs/my ckpt", "out dir", "36,1")
    assert vision_options(args) == vision and llm_options(args) == llm
    none = export_parser().parse_args(
        shlex.split(rebuild_command(["--demo-tiny"], "b", (9,), vision, None))[3:]
    )
    assert llm_options(none) is None


def test_build_record_round_trips(shared_bundle):
    vision, llm = options_from_build(shared_bundle[1].build)
    assert vision == VisionOptions(preprocess="host") and llm == LLMOptions(quant="fp32")


def test_quantizations_table_is_the_one_value_set():
    from export.cli import export_parser, llm_parser
    from export.quant import QUANTIZATIONS, QUANTS

    assert QUANTS == ("int4", "int8", "fp16", "fp32")
    quant = next(a for a in llm_parser()._actions if a.dest == "quant")
    assert tuple(quant.choices) == QUANTS
    quant = next(a for a in export_parser()._actions if a.dest == "quant")
    assert tuple(quant.choices) == (*QUANTS, "none")
    assert [q.floor for q in QUANTIZATIONS.values()] == [0.65, 0.85, 0.95, 0.999]
    assert all(q.method.startswith(q.name) for q in QUANTIZATIONS.values())


def test_library_modules_do_not_import_the_commands():
    """graphs, decoder and engines sit below build and cli: importing them never imports those,
    nor the `python -m` entry modules."""
    import subprocess
    import sys

    above = ("export.build", "export.cli", "export.onnx", "export.llm", "export.trt", "export.__main__")
    code = (
        "import sys, export.graphs, export.decoder, export.engines, export.gates, export.options; "
        f"print(sorted(m for m in {above!r} if m in sys.modules))"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"


@pytest.mark.parametrize("module", ["export", "export.onnx", "export.llm", "export.trt"])
def test_every_entry_point_still_runs(module):
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and f"usage: python -m {module}" in res.stdout, res.stderr
