"""Runtime test fixtures: the fp32 tiny bundle (built once per session by export), images."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# `pytest tests/runtime` puts tests/ on sys.path, where tests/runtime would shadow the real
# `runtime` package as a namespace package: make sure the repository root comes first.
ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path[:1]:
    sys.path.insert(0, str(ROOT))
if "runtime" in sys.modules and getattr(sys.modules["runtime"], "__file__", None) is None:
    del sys.modules["runtime"]


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory) -> Path:
    """The untrained tiny model (seed 0) exported by export as an fp32 bundle, shared layout."""
    from export import build_tiny_bundle

    return build_tiny_bundle(
        tmp_path_factory.mktemp("rt") / "bundle", tokens="all", layout="shared", quant="fp32"
    )


@pytest.fixture(scope="session")
def pipe(tiny_bundle):
    from runtime.pipeline import Pipeline

    # No KV memory budget: the tiny bundle's default holds one request at its full context, so
    # the concurrency tests sharing this pipeline would get KVCacheFull whenever two requests
    # overlap (timing-dependent). The budget has its own tests (test_kv_budget.py).
    return Pipeline.load(tiny_bundle, threads=1, kv_cache_mb=0)


@pytest.fixture(scope="session")
def image_bytes(real_images) -> list[bytes]:
    """The two real photos as JPEG bytes (what a client sends)."""
    import io

    out = []
    for im in real_images:
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out
