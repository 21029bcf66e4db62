"""Session fixtures for the export tests: exports are slow, so each is made once and shared.

Fixtures never mutate a shared bundle; tests that corrupt one copy it first (`bundle_copy`).
"""

from __future__ import annotations

import shutil

import pytest


@pytest.fixture(scope="session")
def src():
    """The untrained tiny model (seed 0) + its tokenizer, as an export Source."""
    from export.common import tiny_source

    return tiny_source(seed=0)


@pytest.fixture(scope="session")
def pixels(src, real_images):
    """Two real photos through fmvr.preprocess: float32 [2, 3, 336, 336]."""
    from export.common import pixels_for

    return pixels_for(src.model.cfg, real_images)


@pytest.fixture(scope="session")
def shared_bundle(src, tmp_path_factory):
    """`python -m export --demo-tiny --quant fp32 --preprocess host`: all five budgets in one shared
    graph taking pixels + an fp32 decoder (genai builder). Returns (path, manifest).
    (The default, --preprocess graph, is `frame_bundle`; tests/export/test_framegraph.py.)"""
    from export.cli import export_main
    from runtime.bundle import verify_bundle

    out = tmp_path_factory.mktemp("export") / "shared"
    assert export_main(["--demo-tiny", "--out", str(out), "--quant", "fp32", "--preprocess", "host"]) == 0
    return out, verify_bundle(out)


@pytest.fixture(scope="session")
def frame_bundle(src, tmp_path_factory):
    """`python -m export --demo-tiny --quant fp32`, the default: the shared graph takes uint8 frames
    [B, H, W, 3] and preprocesses them itself. Returns (path, manifest)."""
    from export.cli import export_main
    from runtime.bundle import verify_bundle

    out = tmp_path_factory.mktemp("export") / "frames"
    assert export_main(["--demo-tiny", "--out", str(out), "--quant", "fp32"]) == 0
    return out, verify_bundle(out)


@pytest.fixture(scope="session")
def per_budget_bundle(src, tmp_path_factory):
    """Budgets 36 and 1, one graph each (pixels in), then an int8 decoder added by `python -m export.llm`."""
    from export.build import build_bundle
    from export.cli import llm_main
    from export.options import VisionOptions
    from runtime.bundle import verify_bundle

    out = tmp_path_factory.mktemp("export") / "per-budget"
    vision = VisionOptions(layout="per-budget", preprocess="host")
    build_bundle(src, out, tokens=(36, 1), vision=vision, llm=None)
    assert llm_main(["--demo-tiny", "--quant", "int8", "--out", str(out)]) == 0
    return out, verify_bundle(out)


@pytest.fixture(scope="session")
def dynamo_decoders(src, tmp_path_factory):
    """Our own dynamo export, fp32 and int4, through the runtime's quality gate:
    {quant: (bundle-like dir, LLMSection)}."""
    from export.build import record_quality
    from export.decoder import write_llm
    from export.gates import llm_gate
    from export.options import LLMOptions

    out = {}
    for quant in ("fp32", "int4"):
        root = tmp_path_factory.mktemp(f"dynamo-{quant}")
        section, files = write_llm(src.model, src.tokenizer, root, LLMOptions(quant, "cpu", "dynamo", 32))
        record_quality(section, files, llm_gate(root, section, src.model, src.tokenizer, "cpu"))
        out[quant] = (root, section)
    return out


@pytest.fixture
def bundle_copy(shared_bundle, tmp_path):
    """A private copy of the shared bundle, free to corrupt."""
    dst = tmp_path / "bundle"
    shutil.copytree(shared_bundle[0], dst)
    return dst
