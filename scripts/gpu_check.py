"""The prepared GPU check: what a CUDA machine with torch (no TensorRT) can run, saved as JSON.

    python scripts/gpu_check.py [--preset small] [--device cuda] [--out benchmarks/results/gpu_check.json]
                                [--runs 20] [--steps 5] [--skip-export]

1. inference: the torch model on the device in bf16 at every budget (vision encode and one
   prefill forward at batch 1), CUDA-synchronised timings (p50/p90 ms);
2. training: `--steps` AdamW steps under bf16 autocast with gradient checkpointing on the
   language model (activation checkpointing, use_reentrant=False, as train/common.py sets it):
   loss per step, step time, peak GPU memory;
3. export parity: the same model exported (vision graphs only) through export.build, whose
   gate compares runtime.vision (onnxruntime) with PyTorch fp32 per budget; when onnxruntime
   has the CUDA provider, ort-cuda vs ort-cpu on the exported graph as well.

No GPU has run it yet: `--device cpu --preset tiny` is the dry run (tests/export/test_gpu_check.py).
The untrained model (random weights, fixed seed) is enough: this checks that things run and
how fast, not what they answer.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def timed(fn: Any, runs: int, sync: Any) -> dict[str, float]:
    fn()  # warm-up (cuDNN autotune, lazy init)
    sync()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return {"p50": float(np.median(times)), "p90": float(np.percentile(times, 90)), "n": runs}


def device_record(torch: Any, device: str) -> dict[str, Any]:
    rec: dict[str, Any] = {"torch": torch.__version__, "device": device, "machine": platform.machine()}
    if device.startswith("cuda"):
        major, minor = torch.cuda.get_device_capability(0)
        rec.update(
            gpu=torch.cuda.get_device_name(0),
            compute_capability=f"{major}.{minor}",
            cuda=torch.version.cuda,
            bf16_supported=bool(torch.cuda.is_bf16_supported()),
        )
    return rec


def inference(model: Any, cfg: Any, device: str, runs: int, torch: Any, sync: Any) -> dict[str, Any]:
    s = cfg.vision.image_size
    model = model.to(device=device, dtype=torch.bfloat16).eval()
    pixels = torch.randn(1, 3, s, s, device=device, dtype=torch.bfloat16)  # [1, 3, S, S]
    out: dict[str, Any] = {}
    with torch.no_grad():
        for t in cfg.budgets:
            ids = torch.full((1, 16 + t), 1, dtype=torch.long, device=device)  # [1, L]: t image slots
            ids[0, 8 : 8 + t] = cfg.image_token_id
            feats = model.encode_budgets(pixels, (t,))[t]  # [1, t, D]
            assert torch.isfinite(feats.float()).all(), f"non-finite bf16 features at {t}"
            out[str(t)] = {
                "vision_ms": timed(lambda t=t: model.encode_budgets(pixels, (t,)), runs, sync),
                "prefill_ms": timed(
                    lambda t=t, ids=ids: model(ids, pixel_values=pixels, tokens=t), runs, sync
                ),
                "prompt_tokens": int(ids.shape[1]),
            }
    return out


def training(model: Any, cfg: Any, device: str, steps: int, torch: Any, sync: Any) -> dict[str, Any]:
    model = model.to(device=device, dtype=torch.float32).train()
    lm = model.language_model
    checkpointing = "none"
    if hasattr(lm, "activation_checkpointing_enable"):
        lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        checkpointing = "activation_checkpointing_enable(use_reentrant=False)"
    elif hasattr(lm, "gradient_checkpointing_enable"):
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        checkpointing = "gradient_checkpointing_enable(use_reentrant=False)"
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    s, t = cfg.vision.image_size, cfg.budgets[len(cfg.budgets) // 2]
    gen = torch.Generator().manual_seed(0)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    losses, times = [], []
    for _ in range(steps):
        pixels = torch.randn(2, 3, s, s, generator=gen).to(device)  # [2, 3, S, S]
        ids = torch.randint(5, cfg.text.vocab_size, (2, 32 + t), generator=gen).to(device)  # [2, L]
        ids[:, 4 : 4 + t] = cfg.image_token_id
        t0 = time.perf_counter()
        with torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16):
            loss = model(ids, pixel_values=pixels, tokens=t, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
        losses.append(float(loss.detach()))
    rec: dict[str, Any] = {
        "steps": steps,
        "budget": t,
        "batch": 2,
        "checkpointing": checkpointing,
        "autocast": "bf16",
        "losses": losses,
        "step_ms_median": float(np.median(times)),
        "finite": bool(np.isfinite(losses).all()),
    }
    if device.startswith("cuda"):
        rec["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return rec


def export_parity(preset: str, seed: int) -> dict[str, Any]:
    from export.build import build_bundle
    from export.common import tiny_source
    from export.options import VisionOptions

    with tempfile.TemporaryDirectory() as tmp:
        src = tiny_source(seed) if preset == "tiny" else preset_source(preset, seed)
        out, m = build_bundle(
            src, Path(tmp) / "b", tokens=tuple(src.model.cfg.budgets), vision=VisionOptions(), llm=None
        )
        rec: dict[str, Any] = {
            "gate": {
                t: {k: v for k, v in p.items() if k in ("max_abs", "cosine", "ok")}
                for f in m.files
                if f.role == "vision-onnx"
                for t, p in f.parity.items()
            }
        }
        rec["ort_cuda_vs_cpu"] = ort_cuda_parity(out, m)
    return rec


def preset_source(preset: str, seed: int) -> Any:
    from export.common import Source
    from fmvr.config import preset as make_preset
    from fmvr.model import build_model
    from fmvr.tokenizer import preset_tokenizer

    cfg = make_preset(preset)
    model = build_model(cfg, seed=seed).eval()
    return Source(model, preset_tokenizer(cfg), f"{preset} (seed {seed}, untrained projector)", ())


def ort_cuda_parity(root: Path, m: Any) -> dict[str, Any]:
    import onnxruntime as ort

    from export.common import compare
    from runtime.frame_input import frame_batch
    from runtime.vision import OrtVision

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return {"status": "not-run", "reason": "onnxruntime has no CUDAExecutionProvider here"}
    from PIL import Image

    from fmvr.preprocess import Preprocessor

    im = Image.fromarray((np.arange(240 * 320 * 3) % 251).astype(np.uint8).reshape(240, 320, 3))
    pre = Preprocessor.from_dict(m.preprocessing)
    x = frame_batch(im, pre, m.vision.preprocess) if m.vision.preprocess else pre([im])
    gpu, cpu = OrtVision(root, m, "ort-cuda"), OrtVision(root, m, "ort-cpu")
    a, b = gpu.encode(x, m.budgets), cpu.encode(x, m.budgets)
    return {"providers": gpu.providers, **{str(t): compare(b[t], a[t]) for t in m.budgets}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small", help="tiny | small | ... (default small)")
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu for a dry run")
    p.add_argument("--out", default="benchmarks/results/gpu_check.json")
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-export", action="store_true")
    args = p.parse_args(argv)

    import torch

    from fmvr.config import preset
    from fmvr.model import build_model

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: no CUDA device visible to torch (use --device cpu for a dry run)")
        return 2

    def sync() -> None:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    cfg = preset(args.preset)
    rec: dict[str, Any] = {
        "preset": args.preset,
        "seed": args.seed,
        "dry_run": not args.device.startswith("cuda"),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": "python scripts/gpu_check.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "device": device_record(torch, args.device),
    }
    t0 = time.perf_counter()
    rec["inference_bf16"] = inference(
        build_model(cfg, seed=args.seed), cfg, args.device, args.runs, torch, sync
    )
    rec["training"] = training(build_model(cfg, seed=args.seed), cfg, args.device, args.steps, torch, sync)
    if not args.skip_export:
        rec["export"] = export_parity(args.preset, args.seed)
    rec["seconds"] = round(time.perf_counter() - t0, 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rec, indent=1, sort_keys=True) + "\n")
    print(f"wrote {out} ({rec['seconds']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
