"""Vision export: ONNX vs PyTorch on real images, shared == per-budget, dynamic batch, budgets."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from export.common import ExportError, parse_tokens
from export.options import VisionOptions


def run(path, x):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, {"pixel_values": x})))


def torch_feats(src, x, budgets):
    with torch.no_grad():
        return {t: f.numpy() for t, f in src.model.encode_budgets(torch.from_numpy(x), budgets).items()}


def test_every_budget_matches_pytorch_on_real_images(src, shared_bundle, pixels):
    root, m = shared_bundle
    got = run(root / "vision/all.onnx", pixels)
    ref = torch_feats(src, pixels, (576, 144, 36, 9, 1))
    for t, r in ref.items():
        out = got[f"tokens_{t}"]
        assert out.shape == (2, t, 128)
        assert np.abs(out - r).max() <= 1e-4, t
    # ...and the export recorded the same check in the manifest, per budget.
    parity = m.file("vision/all.onnx").parity
    assert sorted(parity, key=int) == ["1", "9", "36", "144", "576"]
    assert all(p["ok"] and p["max_abs"] <= 1e-4 and p["cosine"] > 0.99999 for p in parity.values())
    assert any(name.startswith("sklearn:") for name in parity["36"]["images"])


def test_shared_outputs_equal_per_budget_graphs(shared_bundle, per_budget_bundle, pixels):
    shared = run(shared_bundle[0] / "vision/all.onnx", pixels)
    for t in (36, 1):
        alone = run(per_budget_bundle[0] / f"vision/t{t}.onnx", pixels)
        assert list(alone) == [f"tokens_{t}"]
        np.testing.assert_allclose(alone[f"tokens_{t}"], shared[f"tokens_{t}"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("batch", [1, 3])
def test_dynamic_batch(src, shared_bundle, pixels, batch):
    x = np.concatenate([pixels, pixels[:1]])[:batch]  # [batch, 3, 336, 336]
    got = run(shared_bundle[0] / "vision/all.onnx", x)
    ref = torch_feats(src, x, (36, 9))
    for t in (36, 9):
        assert got[f"tokens_{t}"].shape == (batch, t, 128)
        assert np.abs(got[f"tokens_{t}"] - ref[t]).max() <= 1e-4


def test_graph_io_and_manifest_vision_section(shared_bundle, per_budget_bundle):
    g = onnx.load(str(shared_bundle[0] / "vision/all.onnx")).graph
    (inp,) = g.input
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert inp.name == "pixel_values" and isinstance(dims[0], str) and dims[1:] == [3, 336, 336]
    assert [o.name for o in g.output] == [f"tokens_{t}" for t in (576, 144, 36, 9, 1)]
    v = shared_bundle[1].vision
    assert v.layout == "shared" and v.input_dtype == "float32" and v.hidden_size == 128
    assert v.output_for(9).file == "vision/all.onnx" and v.output_for(9).output == "tokens_9"
    pv = per_budget_bundle[1].vision
    assert pv.layout == "per-budget" and pv.output_for(1).file == "vision/t1.onnx"
    with pytest.raises(ValueError, match="valid budgets: 36, 1"):
        pv.output_for(9)


def test_parse_tokens():
    budgets = (576, 144, 36, 9, 1)
    assert parse_tokens("all", budgets) == budgets
    assert parse_tokens("1,36,9", budgets) == (36, 9, 1)
    with pytest.raises(ExportError, match=r"\[100\] are not budgets.*576, 144, 36, 9, 1"):
        parse_tokens("36,100", budgets)
    with pytest.raises(ExportError, match="comma-separated"):
        parse_tokens("thirty", budgets)


def test_cli_unknown_budget_and_missing_checkpoint(tmp_path, capsys):
    from export.cli import onnx_main as main

    assert main(["--demo-tiny", "--tokens", "37", "--out", str(tmp_path / "b")]) == 2
    assert "37" in capsys.readouterr().out and not (tmp_path / "b").exists()
    assert main(["--tokens", "36", "--out", str(tmp_path / "b")]) == 2
    out = capsys.readouterr().out
    assert "no --checkpoint" in out and "python -m train" in out and "--demo-tiny" in out
    assert main(["--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "b")]) == 2
    assert "not found" in capsys.readouterr().out


PIXELS_PER_BUDGET = VisionOptions(layout="per-budget", preprocess="host")  # the graphs reuse_graph copies


def reuse_graph(per_budget_bundle, corrupt=None):
    """An export_graph that copies an already exported t36 graph (speed), then corrupts it."""
    import shutil

    def fake_export(model, tokens, path, opts):
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(per_budget_bundle[0] / "vision/t36.onnx", path)
        if corrupt:
            corrupt(path)
        return ["tokens_36"]

    return fake_export


def test_parity_failure_exits_nonzero_and_leaves_no_bundle(src, per_budget_bundle, tmp_path, monkeypatch):
    """A graph past tolerance: the error lists the budget and no bundle is written."""
    import export.gates as eg
    import export.graphs as eo
    from export.build import build_bundle

    monkeypatch.setattr(eo, "export_graph", reuse_graph(per_budget_bundle))
    monkeypatch.setattr(eg, "FP32_MAX_ABS", 1e-12)
    with pytest.raises(ExportError, match=r"vision/t36.onnx T=36: max_abs"):
        build_bundle(src, tmp_path / "b", tokens=(36,), vision=PIXELS_PER_BUDGET, llm=None)
    assert list(tmp_path.iterdir()) == []


def scale_a_weight(path):
    """Edit the graph after export: its largest initializer doubled (a valid but wrong graph)."""
    from onnx import numpy_helper

    model = onnx.load(str(path))
    init = max(model.graph.initializer, key=lambda t: np.prod(t.dims))
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 2, init.name))
    onnx.save(model, str(path))


def truncate(path):
    path.write_bytes(path.read_bytes()[:1000])


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (scale_a_weight, r"(?s)runtime's output differs from PyTorch.*vision/t36.onnx T=36"),
        (truncate, r"runtime cannot run the exported vision graphs"),
    ],
)
def test_a_graph_corrupted_after_export_fails_the_gate_in_the_runtime_loader(
    src, per_budget_bundle, tmp_path, monkeypatch, corrupt, message
):
    """The gate loads the written bundle with runtime.vision (hashes taken after the damage, so
    only running it can tell): a bad graph is refused and no bundle is left."""
    import export.graphs as eo
    import runtime.vision as rv
    from export.build import build_bundle

    loads = []
    real = rv.load_backend
    monkeypatch.setattr(rv, "load_backend", lambda *a, **kw: loads.append(a[2]) or real(*a, **kw))
    monkeypatch.setattr(eo, "export_graph", reuse_graph(per_budget_bundle, corrupt))
    with pytest.raises(ExportError, match=message):
        build_bundle(src, tmp_path / "b", tokens=(36,), vision=PIXELS_PER_BUDGET, llm=None)
    assert loads == ["ort-cpu"] and list(tmp_path.iterdir()) == []


def test_fp16_graph_close_to_pytorch(src, pixels, tmp_path):
    """--fp16: float16 graph (input too), cosine vs PyTorch fp32 recorded and within tolerance."""
    from export.build import build_bundle
    from export.gates import FP16_MIN_COSINE

    vision = VisionOptions(precision="fp16", preprocess="host")
    out, m = build_bundle(src, tmp_path / "b", tokens=(9,), vision=vision, llm=None)
    assert m.vision.input_dtype == "float16" and m.files[0].path == "vision/all.fp16.onnx"
    rec = m.files[0].parity["9"]
    assert rec["ok"] and rec["cosine"] >= FP16_MIN_COSINE and rec["max_abs"] > 0
    assert rec["runtime"] == "runtime.vision ort-cpu (CPUExecutionProvider)"
    assert "--fp16" in m.build["command"] and m.build["vision"]["precision"] == "fp16"
    got = run(out / "vision/all.fp16.onnx", pixels.astype(np.float16))["tokens_9"]
    assert got.dtype == np.float16 and got.shape == (2, 9, 128)


def test_fp32_tolerance_scales_with_the_output_magnitude():
    """Trained FMVR outputs reach |x| ~ 1e3; fp32 rounding there exceeds 1e-4 absolute."""
    from export.gates import judge

    unit = {"max_abs": 2e-4, "cosine": 1.0, "ref_max_abs": 1.0}
    large = {"max_abs": 2e-4, "cosine": 1.0, "ref_max_abs": 300.0}
    assert not judge(unit, fp16=False)
    assert judge(large, fp16=False)
    assert not judge({**large, "max_abs": 0.1}, fp16=False)
