"""The export gates: every check runs the bundle through the code that ships in runtime/.

- vision_gate: runtime.vision's onnxruntime backend (as `python -m runtime` loads it, after
  verify_bundle) vs PyTorch fp32 on real images, per budget. A frame-input bundle is checked
  twice: on the host's pad + resize (its graph then reproduces fmvr.preprocess exactly, so the
  fp32 tolerance holds) and on the frames themselves at their own size (the in-graph
  preprocessing vs the PIL path: feature cosine per budget, and pixel error in grey levels).
- engine_gate: runtime.vision.TrtVision vs runtime.vision's onnxruntime backend on the same
  ONNX, plus latency.
- llm_gate: runtime.llm.Decoder (its IO check, its prefill and its greedy decode loop) vs
  transformers: teacher-forced top-1 agreement and 20 greedy tokens.
A bundle cannot pass a gate and then fail to load in the runtime: the gate is that load.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from export import trt_rules
from export.common import ExportError, compare
from export.quant import quantization
from runtime.bundle import BundleError, LLMSection, Manifest, verify_bundle

# Vision parity vs PyTorch fp32 on the same preprocessed images. The absolute bound scales
# with the output's magnitude past 1: fp32 rounding is relative, and trained FMVR stages
# (5x per stage at init) reach |x| ~ 1e3 at 9 tokens, where 1e-4 absolute is below fp32 eps.
FP32_MAX_ABS = 1e-4
FP32_MIN_COSINE = 0.99999
FP16_MIN_COSINE = 0.999
ENGINE_MIN_COSINE = {"fp32": 0.99999, "fp16": 0.999, "int8": 0.99}  # TensorRT vs onnxruntime
# In-graph preprocessing vs fmvr.preprocess (PIL) on frames at their own size. Measured on the
# frame parity images (tiny and small presets): pixel MAE <= 0.0006 grey levels, max 1 level
# (a few pixels in 10^4 round the other way), 1 - feature cosine <= 5e-8 at every budget. A
# float resize without PIL's rounding after each pass (ONNX Resize antialias, torch's antialias
# bicubic) is at MAE 0.09, plain bicubic at 4.5: the pixel bound below tells them apart.
FRAME_MIN_COSINE = 0.9999
FRAME_MAX_PIXEL_MAE = 0.05  # mean abs error in 0..255 units
FRAME_MAX_PIXEL_ERROR = 1.0  # one grey level
LATENCY_RUNS = 50
GREEDY_TOKENS = 20
AGREEMENT_TEXT = Path(__file__).resolve().parent / "data" / "agreement_text.txt"
GATE_SCENES = 1  # val scenes of the image prompts the LLM gate records (5 questions each)
QUESTIONS = (
    "What color is the circle?",
    "How many objects are there?",
    "Describe the picture.",
    "Is there a red square in the top left corner?",
    "Which digit is written in the image?",
    "What shape is in the center?",
)


def runtime_errors() -> tuple[type[BaseException], ...]:
    """What the runtime's loaders raise for a file they cannot use (onnxruntime's errors are
    not subclasses of anything narrower than Exception)."""
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

    names = ("Fail", "InvalidArgument", "InvalidGraph", "InvalidProtobuf", "NoSuchFile", "RuntimeException")
    return (BundleError, ValueError, *(getattr(ort_state, n) for n in names))


# ---- vision (onnxruntime) ---------------------------------------------------------------------


def reference(model: Any, pixels: np.ndarray, tokens: tuple[int, ...]) -> dict[int, np.ndarray]:
    """PyTorch fp32 features {T: [B, T, D]}."""
    import torch

    with torch.no_grad():
        feats = model.encode_budgets(torch.from_numpy(pixels), tuple(tokens))
    return {t: f.numpy() for t, f in feats.items()}


def judge(stats: dict[str, float], fp16: bool) -> bool:
    if fp16:
        return stats["cosine"] >= FP16_MIN_COSINE
    limit = FP32_MAX_ABS * max(1.0, stats["ref_max_abs"])
    return stats["max_abs"] <= limit and stats["cosine"] >= FP32_MIN_COSINE


def tolerance(fp16: bool) -> str:
    if fp16:
        return f"cosine >= {FP16_MIN_COSINE}"
    return f"max_abs <= {FP32_MAX_ABS} x max(1, max|ref|), cosine >= {FP32_MIN_COSINE}"


def vision_gate(root: Path, model: Any, images: list[Any], names: list[str]) -> Manifest:
    """Verify the bundle at `root`, load its vision graphs with runtime.vision (onnxruntime CPU)
    and compare every budget with PyTorch on `images` (PIL) through fmvr.preprocess. Returns the
    manifest with each graph's parity recorded (the caller writes it); ExportError listing every
    budget out of tolerance."""
    from export.common import frame_parity_images, pixels_for
    from fmvr.preprocess import Preprocessor
    from runtime import vision

    m = verify_bundle(root)
    broken = trt_rules.check_bundle(root, m)  # what TensorRT would refuse fails here, on any machine
    if broken:
        raise ExportError(f"the vision graphs break TensorRT's rules:\n  {trt_rules.explain(broken)}")
    tokens = tuple(m.budgets)
    pre = Preprocessor.from_dict(m.preprocessing)
    fp16 = any(f.precision == "fp16" for f in m.files if f.role == "vision-onnx")
    try:
        backend = vision.load_backend(root, m, "ort-cpu")
        x = pre.resized(images) if m.vision.frame_input else pixels_for(model.cfg, images)
        got = backend.encode(x, tokens)  # {T: [B, T, D]}
        frames = frame_gate(backend, m, model, fp16, *frame_parity_images()) if m.vision.frame_input else {}
    except runtime_errors() as e:
        raise ExportError(f"the runtime cannot run the exported vision graphs: {e}") from e
    ref = reference(model, pixels_for(model.cfg, images), tokens)
    runtime = f"runtime.vision {backend.name} ({backend.provider})"
    failures = []
    for f in m.files:
        if f.role != "vision-onnx":
            continue
        fp16 = f.precision == "fp16"
        for t in f.budgets:
            stats = compare(ref[t], got[t])
            ok = judge(stats, fp16)
            f.parity[str(t)] = {
                **stats,
                "ok": ok,
                "tolerance": tolerance(fp16),
                "images": names,
                "reference": "pytorch fp32",
                "runtime": runtime + (", host pad + resize as frames" if m.vision.frame_input else ""),
            }
            if not ok:
                failures.append(
                    f"{f.path} T={t}: max_abs {stats['max_abs']:.3g}, cosine {stats['cosine']:.6f} "
                    f"({tolerance(fp16)})"
                )
            if t in frames:
                f.parity[str(t)]["frames"] = frames[t]
                if not frames[t]["ok"]:
                    failures.append(f"{f.path} T={t} on frames: cosine {frames[t]['min_cosine']:.6f}")
    if m.vision.preprocess is not None and not m.vision.preprocess.parity.get("ok", True):
        failures.append(f"in-graph preprocessing vs fmvr.preprocess: {m.vision.preprocess.parity['summary']}")
    if failures:
        raise ExportError(
            "the runtime's output differs from PyTorch past tolerance (no bundle written):\n  "
            + "\n  ".join(failures)
        )
    return m


def frame_gate(
    backend: Any, m: Manifest, model: Any, fp16: bool, images: list[Any], names: list[str]
) -> dict[int, Any]:
    """Frames at their own size through the graph's own preprocessing vs PyTorch on fmvr.preprocess's
    pixels: {T: parity record}; the pixel-level record goes into m.vision.preprocess.parity."""
    from export.common import pixels_for
    from fmvr.preprocess import Preprocessor
    from runtime.frame_input import frame_batch

    spec = m.vision.preprocess
    assert spec is not None
    pre = Preprocessor.from_dict(m.preprocessing)
    host = pixels_for(model.cfg, images)  # [N, 3, S, S]
    ref = reference(model, host, tuple(m.budgets))
    feats: dict[int, list[np.ndarray]] = {t: [] for t in m.budgets}
    errors = []
    for i, im in enumerate(images):
        x = frame_batch(im, pre, spec)  # [1, H, W, 3]
        for t, y in backend.encode(x, m.budgets).items():
            feats[t].append(y[0])
        grey = np.abs(backend.pixels(x)[0] - host[i]) * np.asarray(pre.std, np.float32)[:, None, None] * 255
        errors.append(grey)  # [3, S, S] in 0..255 units
    mae = [float(e.mean()) for e in errors]
    worst = max(float(e.max()) for e in errors)
    ok = max(mae) <= FRAME_MAX_PIXEL_MAE and worst <= FRAME_MAX_PIXEL_ERROR + 1e-3
    spec.parity = {
        "mean_abs_error": float(np.mean(mae)),
        "max_abs_error": worst,
        "exact_fraction": float(np.mean([(e < 1e-3).mean() for e in errors])),
        "per_image_mae": dict(zip(names, mae)),
        "images": names,
        "units": "grey levels (0..255), vs fmvr.preprocess",
        "tolerance": f"per-image MAE <= {FRAME_MAX_PIXEL_MAE}, max <= {FRAME_MAX_PIXEL_ERROR}",
        "ok": ok,
        "summary": f"worst image MAE {max(mae):.4f}, max {worst:.2f} grey levels",
    }
    out, floor = {}, FP16_MIN_COSINE if fp16 else FRAME_MIN_COSINE
    for t, ys in feats.items():
        per = [compare(ref[t][i], y)["cosine"] for i, y in enumerate(ys)]
        stats = compare(ref[t], np.stack(ys))
        out[t] = {
            "cosine": stats["cosine"],
            "min_cosine": min(per),
            "max_abs": stats["max_abs"],
            "ok": min(per) >= floor,
            "tolerance": f"cosine >= {floor} on every image",
            "images": names,
            "reference": "pytorch fp32 on fmvr.preprocess (PIL) pixels",
            "runtime": f"runtime.vision {backend.name}, frames at their own size, in-graph preprocessing",
        }
    return out


# ---- vision (TensorRT) ----------------------------------------------------------------------------


def latency_ms(
    run: Callable[[np.ndarray], Any], pixels: np.ndarray, runs: int = LATENCY_RUNS
) -> dict[str, float]:
    """Median/p90 wall time of one call: host->device copy, execute, device->host copy."""
    for _ in range(5):
        run(pixels)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        run(pixels)
        times.append((time.perf_counter() - t0) * 1000)
    return {
        "median": float(np.median(times)),
        "p90": float(np.percentile(times, 90)),
        "runs": runs,
        "batch": int(pixels.shape[0]),
    }


def engine_gate(bundle: Path, m: Manifest, tokens: int, max_batch: int, opt_batch: int) -> dict[str, Any]:
    """The engine m.vision.engines[tokens] (on disk, listed in `m`) run by runtime.vision.TrtVision
    vs runtime.vision's onnxruntime backend on the bundle's ONNX, on real images (a frame-input
    bundle: frames at their own size, one at a time): {"parity": max abs/cosine, "latency_ms"}."""
    from export.common import frame_parity_images, parity_images, pixels_for
    from fmvr.config import FMVRConfig
    from fmvr.preprocess import Preprocessor
    from runtime.frame_input import frame_batch
    from runtime.vision import OrtVision, TrtVision

    spec = m.vision.preprocess
    if spec is None:
        images, names = parity_images()
        inputs = [pixels_for(FMVRConfig.from_dict(m.model["config"]), images)[:max_batch]]  # [N, 3, S, S]
        names = names[: len(inputs[0])]
    else:
        images, names = frame_parity_images()
        pre = Preprocessor.from_dict(m.preprocessing)
        inputs = [frame_batch(im, pre, spec) for im in images]  # each [1, H, W, 3]
    engine = TrtVision(bundle, m, budgets=[tokens])
    onnx = OrtVision(bundle, m, "ort-cpu")
    got = np.concatenate([engine.encode(x, [tokens])[tokens] for x in inputs])  # [N, T, D]
    ref = np.concatenate([onnx.encode(x, [tokens])[tokens] for x in inputs])
    batch = np.repeat(inputs[0][:1], opt_batch, axis=0)  # [opt, 3, S, S] or [opt, H, W, 3]
    return {
        "parity": {
            **compare(ref, got),
            "images": names,
            "reference": "runtime.vision ort-cpu (same ONNX)",
            "runtime": "runtime.vision tensorrt" + (", frames at their own size" if spec else ""),
        },
        "latency_ms": {**latency_ms(lambda x: engine.encode(x, [tokens]), batch), "input": list(batch.shape)},
    }


# ---- LLM ---------------------------------------------------------------------------------------------


def text_prompts(tokenizer: Any, template: str, bos_id: int | None) -> list[list[int]]:
    """The fixed prompt set, text only (no image placeholder)."""
    from fmvr.tokenizer import prompt_ids

    return [prompt_ids(tokenizer, template, q, 0, bos_id) for q in QUESTIONS]


def torch_logits(lm: Any, ids: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return lm(input_ids=torch.tensor([ids])).logits[0].float().numpy()  # [S, V]


def torch_greedy(lm: Any, ids: list[int], n: int = GREEDY_TOKENS) -> list[int]:
    """transformers' forward with its KV cache through fmvr.model.decode (n tokens, no eos stop)."""
    import torch

    from fmvr.model import decode

    emb = lm.get_input_embeddings()(torch.tensor([ids]))  # [1, S, H]
    return decode(lm, emb, torch.ones(1, len(ids), dtype=torch.long), None, n, eos_id=None)[0]


def runtime_greedy(dec: Any, ids: list[int], n: int = GREEDY_TOKENS) -> list[int]:
    """n greedy tokens from runtime.llm's own decode loop (no stop token)."""
    from runtime.llm import SamplingParams

    return list(dec.start(dec.embed(ids), SamplingParams(max_new_tokens=n)))


def paragraphs(tokenizer: Any) -> list[np.ndarray]:
    """The fixed plain-text set (export/data/agreement_text.txt, one paragraph a line) as ids."""
    lines = [t for t in AGREEMENT_TEXT.read_text().split("\n") if t.strip()]
    return [np.asarray(tokenizer.encode(t).ids, dtype=np.int64) for t in lines]


def gate_budgets(budgets: Any) -> tuple[int, ...]:
    """The budgets whose image prompts the LLM gate records: the largest, and 36 where the model
    serves it (a `none` cascade serves only its full grid)."""
    return tuple(sorted({max(budgets)} | ({36} & set(budgets)), reverse=True))


def image_prompts(model: Any, tokenizer: Any, budgets: tuple[int, ...], scenes: int) -> dict[int, list[Any]]:
    """{budget: [(inputs_embeds [1, S, D] (torch), first position after the image)]}: the
    built-in benchmark's val scenes (detail variant), every question with its reference answer
    after the image, the visual tokens from PyTorch."""
    import torch

    from fmvr import tasks
    from fmvr.preprocess import Preprocessor
    from fmvr.tokenizer import expand_image_tokens, prompt_ids

    cfg = model.cfg
    pre = Preprocessor.from_config(cfg)
    out: dict[int, list[Any]] = {t: [] for t in budgets}
    for scene in tasks.scenes("val", scenes, 0, "detail"):
        with torch.no_grad():
            visual = model.encode_budgets(torch.from_numpy(pre([tasks.render_scene(scene)])), budgets)
        for _, q, a in scene.questions:
            ids = prompt_ids(tokenizer, cfg.template, q, 1, cfg.bos_id) + tokenizer.encode(a).ids
            for t in budgets:
                full = expand_image_tokens(ids + [cfg.eos_token_id], cfg.image_token_id, t)
                after = max(i for i, x in enumerate(full) if x == cfg.image_token_id) + 1
                with torch.no_grad():
                    out[t].append((model.embed(torch.tensor([full]), visual[t]), after))  # [1, S, D]
    return out


def torch_refs(lm: Any, seqs: list[Any]) -> list[np.ndarray]:
    """PyTorch fp32 logits [S, V] of each sequence: token ids, or (inputs_embeds, start)."""
    import torch

    with torch.no_grad():
        return [
            lm(input_ids=torch.as_tensor(np.asarray(x))[None]).logits[0].float().numpy()
            if not isinstance(x, tuple)
            else lm(inputs_embeds=x[0]).logits[0].float().numpy()
            for x in seqs
        ]


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def agreement(dec: Any, seqs: list[Any], refs: list[np.ndarray]) -> dict[str, float]:
    """Teacher-forced top-1 agreement with the PyTorch logits `refs`, the mean KL divergence
    KL(fp32 || decoder) in nats (steadier than top-1 where fp32's first two are near a tie) and
    the max abs logit error: at every position of a text sequence (token ids), at the positions
    after the image of an image sequence ((inputs_embeds, start): what follows a visual token is
    never a prediction anyone reads)."""
    same = total = 0
    kl = err = 0.0
    for x, ref in zip(seqs, refs):
        if isinstance(x, tuple):
            emb, start = x[0].numpy().astype(dec.embed_dtype), x[1]
        else:
            emb, start = dec.embed(x), 0
        got, want = dec.logits(emb)[start:].astype(np.float64), ref[start:].astype(np.float64)
        same += int((want.argmax(-1) == got.argmax(-1)).sum())
        total += len(want)
        logp, logq = log_softmax(want), log_softmax(got)
        kl += float((np.exp(logp) * (logp - logq)).sum())
        err = max(err, float(np.abs(want - got).max()))
    return {
        "top1": same / total,
        "kl": kl / total,
        "max_abs_logit_err": err,
        "positions": total,
        "prompts": len(seqs),
    }


def load_decoder(root: Path, section: LLMSection, provider: str, max_len: int) -> Any:
    """runtime.llm.Decoder.load, as the runtime calls it; its errors become ExportErrors."""
    from runtime.llm import Decoder

    try:
        return Decoder.load(root, section, [provider], max_len, threads=0)
    except runtime_errors() as e:
        raise ExportError(f"the runtime cannot load the exported decoder: {e}") from e


def llm_gate(root: Path, section: LLMSection, model: Any, tokenizer: Any, target: str) -> dict[str, Any]:
    """The decoder under `root` through runtime.llm.Decoder vs PyTorch fp32: the manifest's
    quantization.agreement record. ExportError below the quantization's floor."""
    import onnxruntime as ort

    cfg, lm = model.cfg, model.language_model
    provider = "CUDAExecutionProvider" if target == "cuda" else "CPUExecutionProvider"
    if provider not in ort.get_available_providers():
        return {
            "status": "not-run",
            "reason": f"a --target {target} decoder is checked with {provider} (onnxruntime-gpu); "
            "rerun the export where it is available",
        }
    dec = load_decoder(root, section, provider, cfg.text.max_position_embeddings)
    prompts = text_prompts(tokenizer, cfg.template, cfg.bos_id)
    floor = quantization(section.quant).floor
    rec: dict[str, Any] = {
        "status": "measured",
        "provider": provider,
        "runtime": "runtime.llm.Decoder",
        "reference": "pytorch fp32",
        **agreement(dec, prompts, torch_refs(lm, prompts)),  # the gated set: the questions
        "floor": floor,
    }
    # recorded beside it: plain text, and the benchmark's questions after an image
    texts = paragraphs(tokenizer)
    sets = {"paragraphs": (texts, torch_refs(lm, texts))}
    for t, seqs in image_prompts(model, tokenizer, gate_budgets(cfg.budgets), GATE_SCENES).items():
        sets[f"images_{t}"] = (seqs, torch_refs(lm, seqs))
    rec["sets"] = {name: agreement(dec, seqs, refs) for name, (seqs, refs) in sets.items()}
    ours, theirs = runtime_greedy(dec, prompts[0]), torch_greedy(lm, prompts[0])
    rec["greedy_tokens"] = GREEDY_TOKENS
    rec["greedy_match"] = sum(a == b for a, b in zip(ours, theirs)) / GREEDY_TOKENS
    rec["greedy_equal"] = ours == theirs
    rec["ok"] = rec["top1"] >= floor and (section.quant != "fp32" or rec["greedy_equal"])
    if not rec["ok"]:
        raise ExportError(
            f"{section.quant} decoder below its quality floor: top-1 {rec['top1']:.3f} (floor {floor}), "
            f"greedy equal {rec['greedy_equal']}; try --quant int8, a smaller --block-size, "
            "or --exporter dynamo"
        )
    return rec
