"""The bundle: manifest content, hash verification, atomic writing, clear errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from runtime.bundle import (
    MANIFEST_NAME,
    SCHEMA_VERSION,
    BundleError,
    EngineEntry,
    atomic_bundle,
    engine_mismatch,
    read_manifest,
    verify_bundle,
)


def test_manifest_holds_what_a_torch_free_runtime_needs(src, shared_bundle):
    from fmvr.config import FMVRConfig
    from fmvr.preprocess import Preprocessor
    from fmvr.tokenizer import load_tokenizer

    root, m = shared_bundle
    raw = json.loads((root / MANIFEST_NAME).read_text())
    assert raw["schema_version"] == SCHEMA_VERSION
    cfg = src.model.cfg
    assert FMVRConfig.from_dict(m.model["config"]) == cfg and m.model["config_hash"] == cfg.hash()
    assert m.budgets == [576, 144, 36, 9, 1] and m.template == "vicuna_v1"
    assert m.special_tokens == {"bos": 1, "eos": 2, "pad": 0, "image": 4}
    assert Preprocessor.from_dict(m.preprocessing) == Preprocessor.from_config(cfg)
    assert (
        load_tokenizer(root / m.tokenizer).encode("a red circle").ids
        == src.tokenizer.encode("a red circle").ids
    )
    assert {"torch", "onnx", "onnxruntime"} <= set(m.tools)
    cmd = m.build["command"]
    assert cmd.startswith("python -m export --demo-tiny") and cmd.endswith("--force")
    assert "--layout shared --opset 18 --preprocess host --quant fp32 --target cpu --exporter auto" in cmd
    assert m.build["vision"] == {
        "layout": "shared",
        "precision": "fp32",
        "opset": 18,
        "preprocess": "host",
        "max_frame": [1920, 1920],
    }
    assert m.build["llm"] == {
        "quant": "fp32",
        "target": "cpu",
        "exporter": "auto",
        "block_size": 32,
        "kv_cache_mb": None,
    }
    assert m.llm.quant == "fp32" and m.file("llm/decoder.onnx").precision == "fp32"
    roles = {f.path: f.role for f in m.files}
    assert roles == {
        "vision/all.onnx": "vision-onnx",
        "llm/decoder.onnx": "llm-decoder",
        "llm/decoder.onnx.data": "llm-data",
        "llm/embed_tokens.npy": "embed",
        "tokenizer/tokenizer.json": "tokenizer",
    }
    assert all(len(f.sha256) == 64 and f.bytes > 0 for f in m.files)
    assert m.file("vision/all.onnx").shapes["tokens_36"] == ["batch", 36, 128]


def test_hashes_verify_and_a_flipped_byte_is_caught(bundle_copy):
    verify_bundle(bundle_copy)
    p = bundle_copy / "llm/decoder.onnx.data"
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x01
    p.write_bytes(data)
    with pytest.raises(
        BundleError, match=r"llm/decoder.onnx.data fails its sha256.*python -m export --demo-tiny"
    ):
        verify_bundle(bundle_copy)


def test_missing_truncated_and_wrong_schema(bundle_copy):
    (bundle_copy / "tokenizer/tokenizer.json").unlink()
    with pytest.raises(BundleError, match="tokenizer/tokenizer.json is missing"):
        verify_bundle(bundle_copy)
    emb = bundle_copy / "llm/embed_tokens.npy"
    emb.write_bytes(emb.read_bytes()[:-10])
    (bundle_copy / "tokenizer").rmdir()
    with pytest.raises(BundleError):
        verify_bundle(bundle_copy)
    raw = json.loads((bundle_copy / MANIFEST_NAME).read_text())
    raw["schema_version"] = 99
    (bundle_copy / MANIFEST_NAME).write_text(json.dumps(raw))
    with pytest.raises(BundleError, match=f"schema_version 99.*reads {SCHEMA_VERSION}.*--force"):
        read_manifest(bundle_copy)


def test_unlisted_reference_and_not_a_bundle(bundle_copy, tmp_path):
    raw = json.loads((bundle_copy / MANIFEST_NAME).read_text())
    raw["files"] = [f for f in raw["files"] if f["path"] != "llm/embed_tokens.npy"]
    (bundle_copy / MANIFEST_NAME).write_text(json.dumps(raw))
    with pytest.raises(BundleError, match="embed_tokens.npy is used by the manifest but not hash-listed"):
        verify_bundle(bundle_copy)
    with pytest.raises(BundleError, match="no manifest.json"):
        read_manifest(tmp_path)
    with pytest.raises(BundleError, match="not a directory"):
        read_manifest(tmp_path / "nothing")


def test_existing_output_refused_without_force(bundle_copy, capsys):
    from export.cli import export_main

    before = (bundle_copy / MANIFEST_NAME).read_bytes()
    assert export_main(["--demo-tiny", "--out", str(bundle_copy)]) == 2
    out = capsys.readouterr().out
    assert "already exists" in out and "--force" in out
    assert (bundle_copy / MANIFEST_NAME).read_bytes() == before


def test_atomic_writer_replaces_with_force_and_cleans_up(tmp_path):
    out = tmp_path / "b"
    with atomic_bundle(out) as d:
        (d / MANIFEST_NAME).write_text("{}")
        (d / "old").write_text("x")
    with pytest.raises(BundleError, match="already exists"), atomic_bundle(out):
        pass
    with atomic_bundle(out, force=True) as d:
        (d / MANIFEST_NAME).write_text("{}")
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST_NAME]
    assert [p.name for p in tmp_path.iterdir()] == ["b"]  # no temp or old folders left
    with pytest.raises(BundleError, match="did not write manifest.json"), atomic_bundle(tmp_path / "c"):
        pass
    assert [p.name for p in tmp_path.iterdir()] == ["b"]


@pytest.mark.parametrize("swap", ["exchange", "two renames"])
def test_a_failed_swap_puts_the_old_bundle_back(tmp_path, monkeypatch, swap):
    """--force over an existing bundle: if the new one cannot be put in place, the old one is
    there (the one-step exchange, and the fallback's rename aside + rename in)."""
    import fmvr.atomic

    out = tmp_path / "b"
    with atomic_bundle(out) as d:
        (d / MANIFEST_NAME).write_text("old")
    real = fmvr.atomic.os.replace

    def no_exchange(a, b):
        if swap == "exchange":
            raise OSError("disk full")
        return False

    monkeypatch.setattr(fmvr.atomic, "exchange", no_exchange)

    def failing(src, dst):
        if ".partial-" in str(src):
            raise OSError("disk full")
        real(src, dst)

    monkeypatch.setattr(fmvr.atomic.os, "replace", failing)
    with pytest.raises(OSError, match="disk full"), atomic_bundle(out, force=True) as d:
        (d / MANIFEST_NAME).write_text("new")
    assert (out / MANIFEST_NAME).read_text() == "old"
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".b.old-")] == ["b"]


def test_interrupted_export_leaves_no_bundle(src, tmp_path, monkeypatch):
    import export.build as eb
    from export.build import build_bundle

    def interrupted(model, root, *args):
        (root / "vision").mkdir()
        (root / "vision/all.onnx").write_bytes(b"half a graph")
        raise KeyboardInterrupt

    monkeypatch.setattr(eb, "write_vision", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_bundle(src, tmp_path / "bundle", tokens=(36,), llm=None)
    assert list(tmp_path.iterdir()) == []


def test_engine_mismatch_says_how_to_rebuild():
    e = EngineEntry("vision/t36.fp16.engine", "vision/t36.fp16.engine.json", "fp16", "10.3.0", "Orin", "8.7")
    assert engine_mismatch(e, "10.3.0", "8.7", "CMD") is None
    msg = engine_mismatch(e, "10.7.0", "8.9", "python -m export.trt --bundle b --tokens 36 --fp16")
    assert "TensorRT 10.3.0" in msg and "8.7 (Orin)" in msg and "python -m export.trt" in msg


def test_bundle_schema_module_is_torch_free():
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None; "
        "import runtime.bundle as b; print(b.SCHEMA_VERSION)"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == str(SCHEMA_VERSION)


def test_build_tiny_bundle_helper(shared_bundle, tmp_path):
    """The helper other packages' tests call: a verified fp32 bundle (vision-only here for speed)."""
    from export import build_tiny_bundle

    out = build_tiny_bundle(tmp_path / "tiny", tokens="36", quant=None)
    m = verify_bundle(out)
    assert m.budgets == [36] and m.llm is None and m.vision.output_for(36).file == "vision/all.onnx"


def test_export_from_a_saved_checkpoint(src, tmp_path, pixels, real_images, capsys):
    """--checkpoint: the saved model and its tokenizer go into the bundle, parity against it
    (its graph takes frames: the host's pad + resize reproduces the pixels exactly)."""
    import numpy as np
    import onnxruntime as ort
    import torch

    from export.cli import onnx_main as main
    from fmvr.checkpoint import save_checkpoint
    from fmvr.preprocess import Preprocessor

    frames = Preprocessor.from_config(src.model.cfg).resized(real_images)  # [2, 336, 336, 3] uint8

    ckpt = save_checkpoint(src.model, tmp_path / "ckpt", tokenizer=src.tokenizer)
    assert main(["--checkpoint", str(ckpt), "--tokens", "9", "--out", str(tmp_path / "b")]) == 0
    m = verify_bundle(tmp_path / "b")
    assert m.build["checkpoint"] == f"--checkpoint {ckpt}" and m.model["source"] == str(ckpt)
    sess = ort.InferenceSession(str(tmp_path / "b/vision/all.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        ref = src.model.encode_image(torch.from_numpy(pixels), 9).numpy()
    assert np.abs(sess.run(["tokens_9"], {"frames": frames})[0] - ref).max() <= 1e-4
    (ckpt / "tokenizer.json").unlink()
    assert main(["--checkpoint", str(ckpt), "--tokens", "9", "--out", str(tmp_path / "c")]) == 2
    assert "no tokenizer.json" in capsys.readouterr().out


def test_a_manifest_path_outside_the_bundle_is_refused(bundle_copy):
    raw = json.loads((bundle_copy / MANIFEST_NAME).read_text())
    raw["files"][0]["path"] = "../outside.onnx"
    (bundle_copy / MANIFEST_NAME).write_text(json.dumps(raw))
    with pytest.raises(BundleError, match="outside the bundle"):
        verify_bundle(bundle_copy)


def test_export_into_a_nearly_full_disk_is_refused_before_writing(tmp_path, monkeypatch, capsys):
    """The free-space query says 70 MB: the tiny export's estimate + margin does not fit."""
    from export.cli import export_main
    from fmvr import staging

    monkeypatch.setattr(staging, "free_bytes", lambda path: 70 << 20)
    out = tmp_path / "b"
    assert export_main(["--demo-tiny", "--out", str(out)]) == 2
    msg = capsys.readouterr().out
    assert "not enough free space" in msg and str(out) in msg and "70.0 MB free" in msg, msg
    assert list(tmp_path.iterdir()) == []  # nothing written
