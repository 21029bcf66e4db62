"""Quality record of an exported decoder: greedy tokens vs transformers, top-1 agreement.

The ONNX decoder contract (runtime/bundle.py LLMSection): inputs_embeds [B,S,H],
attention_mask [B,P+S] int64, past_key_values.{i}.key/.value [B,kv,P,hd] -> logits [B,S,V],
present.{i}.key/.value [B,kv,P+S,hd].
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

GREEDY_TOKENS = 20
QUESTIONS = (
    "What color is the circle?",
    "How many objects are there?",
    "Describe the picture.",
    "Is there a red square in the top left corner?",
    "Which digit is written in the image?",
    "What shape is in the center?",
)
# Floors of teacher-forced top-1 agreement with PyTorch fp32 logits (fixed prompt set).
# Set from the untrained tiny model (the hardest case: near-flat logits); trained models agree more.
FLOORS = {"fp32": 0.999, "fp16": 0.95, "int8": 0.85, "int4": 0.65}


class OrtDecoder:
    """One onnxruntime session over the decoder contract, fed numpy arrays."""

    def __init__(self, path: Path, num_layers: int, num_kv_heads: int, head_dim: int, provider: str) -> None:
        import onnxruntime as ort

        self.sess = ort.InferenceSession(str(path), providers=[provider])
        self.layers, self.kvh, self.hd = num_layers, num_kv_heads, head_dim
        types = {i.name: i.type for i in self.sess.get_inputs()}
        self.dtype = np.float16 if types["inputs_embeds"] == "tensor(float16)" else np.float32
        self.kv_dtype = np.float16 if types["past_key_values.0.key"] == "tensor(float16)" else np.float32
        self.out_names = [o.name for o in self.sess.get_outputs()]

    def empty_past(self, batch: int = 1) -> dict[str, np.ndarray]:
        shape = (batch, self.kvh, 0, self.hd)  # [B, kv, 0, hd]
        return {f"past_key_values.{i}.{kv}": np.zeros(shape, self.kv_dtype)
                for i in range(self.layers) for kv in ("key", "value")}  # fmt: skip

    def __call__(self, embeds: np.ndarray, mask: np.ndarray, past: dict[str, np.ndarray]):
        feed = {"inputs_embeds": embeds.astype(self.dtype), "attention_mask": mask.astype(np.int64), **past}
        outs = dict(zip(self.out_names, self.sess.run(self.out_names, feed)))
        present = {f"past_key_values.{i}.{kv}": outs[f"present.{i}.{kv}"]
                   for i in range(self.layers) for kv in ("key", "value")}  # fmt: skip
        return outs["logits"].astype(np.float32), present


def onnx_greedy(dec: OrtDecoder, table: np.ndarray, ids: list[int], n: int = GREEDY_TOKENS) -> list[int]:
    """n greedy tokens (no eos stop) with the KV cache: prefill, then one token per step."""
    embeds = table[np.asarray(ids)][None]  # [1, S, H]
    mask = np.ones((1, len(ids)), np.int64)
    past = dec.empty_past()
    out: list[int] = []
    for _ in range(n):
        logits, past = dec(embeds, mask, past)
        nxt = int(logits[0, -1].argmax())
        out.append(nxt)
        embeds = table[[nxt]][None]  # [1, 1, H]
        mask = np.ones((1, mask.shape[1] + 1), np.int64)
    return out


def torch_greedy(lm: Any, ids: list[int], n: int = GREEDY_TOKENS) -> list[int]:
    """transformers' greedy decoding with its KV cache (n tokens, no eos stop) from inputs_embeds."""
    import torch

    out: list[int] = []
    with torch.no_grad():
        emb = lm.get_input_embeddings()(torch.tensor([ids]))  # [1, S, H]
        mask = torch.ones(1, len(ids), dtype=torch.long)
        res = lm(inputs_embeds=emb, attention_mask=mask, use_cache=True)
        for _ in range(n):
            nxt = int(res.logits[0, -1].argmax())
            out.append(nxt)
            mask = torch.cat([mask, mask.new_ones(1, 1)], dim=1)  # [1, P+1]
            res = lm(input_ids=torch.tensor([[nxt]]), attention_mask=mask,
                     past_key_values=res.past_key_values, use_cache=True)  # fmt: skip
    return out


def prompt_ids(tokenizer: Any, template: str, bos_id: int | None) -> list[list[int]]:
    """The fixed prompt set, text only (the image placeholder removed)."""
    from fmvr.template import IMAGE_TOKEN, prompt_text

    texts = [prompt_text(template, q).replace(IMAGE_TOKEN + "\n", "") for q in QUESTIONS]
    bos = [] if bos_id is None else [bos_id]
    return [[*bos, *tokenizer.encode(t, add_special_tokens=False).ids] for t in texts]


def torch_logits(lm: Any, ids: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return lm(input_ids=torch.tensor([ids])).logits[0].float().numpy()  # [S, V]


def agreement(dec: OrtDecoder, table: np.ndarray, lm: Any, prompts: list[list[int]]) -> dict[str, float]:
    """Teacher-forced top-1 agreement and max abs logit error vs PyTorch fp32 over every position."""
    same = total = 0
    err = 0.0
    for ids in prompts:
        ref = torch_logits(lm, ids)  # [S, V]
        got = dec(table[np.asarray(ids)][None], np.ones((1, len(ids)), np.int64), dec.empty_past())[0][0]
        same += int((ref.argmax(-1) == got.argmax(-1)).sum())
        total += len(ids)
        err = max(err, float(np.abs(ref - got).max()))
    return {"top1": same / total, "max_abs_logit_err": err, "positions": total, "prompts": len(prompts)}


def quality(
    path: Path, table: np.ndarray, model: Any, tokenizer: Any, quant: str, target: str
) -> dict[str, Any]:
    """The manifest's quantization.agreement record, measured on the target's provider when present."""
    import onnxruntime as ort

    cfg, lm = model.cfg, model.language_model
    provider = "CUDAExecutionProvider" if target == "cuda" else "CPUExecutionProvider"
    if provider not in ort.get_available_providers():
        return {"status": "not-run", "reason": f"a --target {target} decoder is checked with {provider} "
                "(onnxruntime-gpu); rerun the export where it is available"}  # fmt: skip
    dec = OrtDecoder(path, cfg.text.num_layers, cfg.text.num_kv_heads, cfg.text.head_dim, provider)
    prompts = prompt_ids(tokenizer, cfg.template, cfg.bos_id)
    rec: dict[str, Any] = {"status": "measured", "provider": provider, "reference": "pytorch fp32",
                           **agreement(dec, table, lm, prompts), "floor": FLOORS[quant]}  # fmt: skip
    ours = onnx_greedy(dec, table, prompts[0])
    theirs = torch_greedy(lm, prompts[0])
    rec["greedy_tokens"] = GREEDY_TOKENS
    rec["greedy_match"] = sum(a == b for a, b in zip(ours, theirs)) / GREEDY_TOKENS
    rec["greedy_equal"] = ours == theirs
    rec["ok"] = rec["top1"] >= rec["floor"] and (quant != "fp32" or rec["greedy_equal"])
    return rec
