"""LLM decoding over the bundle's ONNX decoder (onnxruntime only, no torch).

Decoder contract (runtime/bundle.py LLMSection, onnxruntime-genai naming):
    inputs   inputs_embeds [B,S,D], attention_mask [B,past+S] int64, (position_ids [B,S]),
             (num_logits_to_keep [1] int64: logits of the last K positions only),
             past_key_values.{i}.key/.value [B, kv_heads, past, head_dim]
    outputs  logits [B,S,V] (or [B,K,V]), present.{i}.key/.value [B, kv_heads, past+S, head_dim]

One `Decoder` serves any number of threads: it holds the session and read-only buffers
(an all-ones mask and the position ramp, preallocated to the model's context length and
sliced per step); every `Generation` holds its own KV cache, so concurrent requests never
share cache state. The KV cache moves through IO binding and stays on the device:
- shared (a GroupQueryAttention decoder, exporter "onnxruntime-genai"): one K and one V buffer
  per layer, [1, kv_heads, prompt + max_new_tokens, head_dim], allocated once per generation and
  bound as both `past` and `present`. GroupQueryAttention sees the same memory on both sides and
  writes only the new positions in place (its past_present_share_buffer mode; the valid length
  comes from attention_mask), so a step neither allocates nor copies the cache, and the binding
  is made once: a step rebinds only the new token's embedding and the mask.
- copy (standard attention, exporter "torch-dynamo"): each step's `present` OrtValues (past + S
  long, a fresh allocation and a copy of the cache) are bound as the next step's `past`.

The KV memory budget (manifest llm.kv_cache_mb, or the runtime's --kv-cache-mb): every generation
reserves the cache of its whole length (prompt + max_new_tokens) when it starts and returns it when
it ends, so the caches of the generations running at once never exceed the budget. A request
whose cache alone exceeds it is a KVCacheTooSmall, a ValueError (lower max_new_tokens or the budget); one that would
fit once others finish is a KVCacheFull (the server answers 503, retry shortly).
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

try:
    import onnxruntime as ort
except ImportError as e:  # aarch64 Linux: `pip install .` leaves onnxruntime to JetPack (pyproject.toml)
    raise ImportError(
        "onnxruntime is not installed. On a Jetson install NVIDIA's onnxruntime-gpu for your JetPack "
        "(docs/USAGE.md, 'Installing only the runtime (Jetson)'); elsewhere pip install 'fmvr-edge[cpu]' "
        f"(or onnxruntime-gpu on an NVIDIA x86 machine). ({e})"
    ) from e

from runtime.bundle import LLMSection

ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
# The decoder's optional input (export.decoder.last_logits_only): logits of the last K positions
# only ([1] int64; generation feeds 1); a decoder without it computes every position's.
KEEP = "num_logits_to_keep"


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()  # stop strings (applied by TextStream)

    def check(self) -> SamplingParams:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        return self


class GenerationTimeout(TimeoutError):
    """The request's timeout passed during decoding."""


class KVCacheFull(RuntimeError):
    """The generations running now hold the KV memory budget: retry once one has finished."""


class KVCacheTooSmall(ValueError):
    """One request's KV cache alone is larger than the KV memory budget."""


class KVBudget:
    """Bytes of KV cache reserved by running generations, against a limit (0: none). Thread-safe."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit, self.reserved = int(limit_bytes), 0
        self._lock = threading.Lock()

    def reserve(self, n: int, what: str) -> None:
        """Take n bytes for `what`, or raise: KVCacheTooSmall when n alone is over the limit,
        KVCacheFull when it fits only once others release theirs."""
        mb = 2**20
        if self.limit and n > self.limit:
            raise KVCacheTooSmall(
                f"{what} needs {n / mb:.1f} MB of KV cache, over this bundle's KV memory budget of "
                f"{self.limit / mb:.1f} MB: lower max_new_tokens or the visual-token budget, or raise "
                "the budget (--kv-cache-mb, at export or at run time)"
            )
        with self._lock:
            if self.limit and self.reserved + n > self.limit:
                raise KVCacheFull(
                    f"the KV memory budget ({self.limit / mb:.1f} MB) is held by running requests "
                    f"({self.reserved / mb:.1f} MB); {what} needs {n / mb:.1f} MB: retry shortly"
                )
            self.reserved += n

    def release(self, n: int) -> None:
        with self._lock:
            self.reserved -= n


def pick_token(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> int:
    """Greedy argmax, or a temperature + top-p (nucleus) sample from logits [V]."""
    if temperature <= 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    sp = p[order]
    keep = np.cumsum(sp) - sp < top_p  # always keeps the top token
    sp = np.where(keep, sp, 0.0)
    return int(order[rng.choice(len(sp), p=sp / sp.sum())])


def check_io(session: ort.InferenceSession, spec: LLMSection) -> dict[str, str]:
    """The session's input types, once its inputs and outputs are checked against the contract
    that `spec` (num_layers + name templates) describes; ValueError naming what differs."""
    types = {i.name: i.type for i in session.get_inputs()}
    outputs = {o.name for o in session.get_outputs()}
    layers = range(spec.num_layers)
    want_in = ["inputs_embeds", "attention_mask"]
    want_in += [t.format(i=i) for i in layers for t in (spec.past_key, spec.past_value)]
    want_out = ["logits", *(t.format(i=i) for i in layers for t in (spec.present_key, spec.present_value))]
    extra = sorted(set(types) - set(want_in) - {"position_ids", KEEP})
    problems = [f"no input {n}" for n in want_in if n not in types]
    problems += [f"no output {n}" for n in want_out if n not in outputs]
    problems += [f"unexpected input {n}" for n in extra]
    if KEEP in types and types[KEEP] != "tensor(int64)":
        problems.append(f"{KEEP} is {types[KEEP]}, not int64")
    floats = [n for n in want_in if n != "attention_mask" and n in types]
    problems += [f"{n} is {types[n]}, not float or float16" for n in floats if types[n] not in ORT_DTYPES]
    if problems:
        raise ValueError(
            f"decoder {spec.decoder} does not follow the bundle contract ({spec.num_layers} layers): "
            + "; ".join(problems[:6])
            + (f" (+{len(problems) - 6} more)" if len(problems) > 6 else "")
        )
    return types


class Decoder:
    """An onnxruntime decoder session + the embedding table; `start` begins a Generation."""

    def __init__(
        self,
        session: ort.InferenceSession,
        spec: LLMSection,
        embed_table: np.ndarray,
        max_len: int,
        kv_cache_mb: float | None = None,
    ) -> None:
        """kv_cache_mb: the KV memory budget of all generations at once (None: the manifest's
        llm.kv_cache_mb; 0: no limit)."""
        self.session, self.spec, self.max_len = session, spec, max_len
        types = check_io(session, spec)
        self.embed_dtype = ORT_DTYPES[types["inputs_embeds"]]
        self.kv_dtype = ORT_DTYPES[types[spec.past_key.format(i=0)]]
        self.has_position_ids = "position_ids" in types
        self.has_keep = KEEP in types
        self.keep_last = np.ones(1, dtype=np.int64)  # read-only
        if embed_table.dtype != self.embed_dtype:
            raise ValueError(
                f"{spec.embed_tokens} is {embed_table.dtype}, the decoder's inputs_embeds is "
                f"{np.dtype(self.embed_dtype)}: they must match"
            )
        self.table = embed_table
        providers = session.get_providers()
        self.device = "cuda" if providers and providers[0] == "CUDAExecutionProvider" else "cpu"
        self.provider = providers[0] if providers else "CPUExecutionProvider"
        # Read-only, shared by every request: sliced per step, never written.
        self.ones = np.ones((1, max_len), dtype=np.int64)  # [1, L]
        self.positions = np.arange(max_len, dtype=np.int64)[None]  # [1, L]
        self.kv_names = [
            (
                spec.past_key.format(i=i),
                spec.past_value.format(i=i),
                spec.present_key.format(i=i),
                spec.present_value.format(i=i),
            )
            for i in range(spec.num_layers)
        ]
        # GroupQueryAttention updates a shared past/present buffer in place; standard attention cannot.
        self.shared_kv = spec.exporter == "onnxruntime-genai"
        mb = spec.kv_cache_mb if kv_cache_mb is None else kv_cache_mb
        if mb < 0:
            raise ValueError(f"the KV memory budget must be >= 0 MB (0: no limit), got {mb:g}")
        self.kv_budget = KVBudget(int(mb * 2**20))

    @classmethod
    def load(
        cls,
        bundle_dir: str | Path,
        spec: LLMSection,
        providers: Sequence[Any],
        max_len: int,
        threads: int = 0,
        kv_cache_mb: float | None = None,
    ) -> Decoder:
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        path = str(Path(bundle_dir) / spec.decoder)
        session = ort.InferenceSession(path, sess_options=opts, providers=list(providers))
        table = np.load(Path(bundle_dir) / spec.embed_tokens, mmap_mode="r", allow_pickle=False)
        if table.shape != (spec.vocab_size, spec.hidden_size):
            raise ValueError(
                f"{spec.embed_tokens} has shape {table.shape}, the manifest says "
                f"[{spec.vocab_size}, {spec.hidden_size}]"
            )
        return cls(session, spec, table, max_len, kv_cache_mb)

    def embed(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Token embeddings [1, S, D] in the decoder's input dtype."""
        return np.asarray(self.table[np.asarray(ids, dtype=np.int64)], dtype=self.embed_dtype)[None]

    def start(
        self,
        embeds: np.ndarray,
        params: SamplingParams,
        timeout_s: float | None = None,
        prefix: Sequence[tuple[np.ndarray, np.ndarray]] | None = None,
        save_prefix: int = 0,
    ) -> Generation:
        """A new generation from prompt embeddings [1, S, D] (its own KV cache). With timeout_s,
        decoding stops with GenerationTimeout once that many seconds have passed from now.
        prefix: the KV state of the prompt's first P positions (per layer (k, v), each
        [1, kv, P, hd]; a `saved_prefix` of an earlier generation): only positions P.. are
        prefilled. save_prefix=P: keep the first P positions' KV state as `saved_prefix` after the
        prefill. Both need a shared-buffer decoder on the CPU (`can_reuse_prefix`)."""
        stop_at = None if timeout_s is None else time.monotonic() + timeout_s
        return Generation(self, embeds, params.check(), stop_at, prefix, save_prefix)

    @property
    def can_reuse_prefix(self) -> bool:
        """A prompt prefix's KV state can be saved and reused (runtime.prefix_cache)."""
        return self.shared_kv and self.device == "cpu"

    def logits(self, embeds: np.ndarray) -> np.ndarray:
        """Logits at every position [S, V] of embeddings [1, S, D]: one prefill, cache dropped
        (scoring; export's quality gate compares these with PyTorch's)."""
        gen = Generation(self, embeds, SamplingParams(max_new_tokens=1))
        if self.has_keep:
            gen.io.bind_cpu_input(KEEP, np.array([embeds.shape[1]], dtype=np.int64))
        try:
            return gen._run(gen.embeds, every_position=True)
        finally:
            gen.release()

    def empty_past(self) -> Any:
        spec = self.spec
        z = np.zeros((1, spec.num_kv_heads, 0, spec.head_dim), dtype=self.kv_dtype)  # [1, kv, 0, hd]
        return ort.OrtValue.ortvalue_from_numpy(z, self.device, 0)

    def kv_bytes(self, positions: int) -> int:
        """Bytes of the K and V cache of `positions` prompt positions, every layer."""
        spec = self.spec
        per = spec.num_kv_heads * spec.head_dim * np.dtype(self.kv_dtype).itemsize
        return 2 * spec.num_layers * positions * per

    def kv_buffer(self, length: int) -> tuple[Any, np.ndarray | None]:
        """An uninitialised [1, kv, length, hd] cache buffer on the decoder's device (only the
        positions below the mask's length are ever read): (OrtValue, the numpy array it shares
        memory with on the CPU, else None)."""
        spec = self.spec
        shape = [1, spec.num_kv_heads, length, spec.head_dim]
        if self.device == "cpu":
            a = np.empty(shape, dtype=self.kv_dtype)
            return ort.OrtValue.ortvalue_from_numpy(a), a  # shares a's memory
        return ort.OrtValue.ortvalue_from_shape_and_type(shape, self.kv_dtype, self.device, 0), None


class Generation:
    """Iterate to get answer token ids (stop tokens are not yielded). Timings in ms after use."""

    def __init__(
        self,
        dec: Decoder,
        embeds: np.ndarray,
        params: SamplingParams,
        stop_at: float | None = None,
        prefix: Sequence[tuple[np.ndarray, np.ndarray]] | None = None,
        save_prefix: int = 0,
    ) -> None:
        """stop_at: time.monotonic() after which decoding stops (GenerationTimeout); None: never.
        prefix, save_prefix: as Decoder.start."""
        if embeds.ndim != 3 or embeds.shape[0] != 1:
            raise ValueError(f"prompt embeddings must be [1, S, D], got {embeds.shape}")
        need = embeds.shape[1] + params.max_new_tokens
        if need > dec.max_len:
            raise ValueError(
                f"prompt ({embeds.shape[1]} tokens) + max_new_tokens ({params.max_new_tokens}) = {need} "
                f"exceeds the model's context of {dec.max_len}; lower max_new_tokens or the budget"
            )
        self.dec, self.params, self.stop_at = dec, params, stop_at
        self.embeds = np.ascontiguousarray(embeds, dtype=dec.embed_dtype)
        self.rng = np.random.default_rng(params.seed)
        self.step_embed = np.empty((1, 1, embeds.shape[2]), dtype=dec.embed_dtype)  # [1, 1, D], reused
        if (prefix is not None or save_prefix) and not dec.can_reuse_prefix:
            raise ValueError(
                "a saved prompt prefix needs a shared-buffer decoder on the CPU (can_reuse_prefix)"
            )
        if prefix is not None and not 0 < prefix[0][0].shape[2] < embeds.shape[1]:
            raise ValueError(
                f"a prefix of {prefix[0][0].shape[2]} positions for a {embeds.shape[1]}-token prompt"
            )
        if not 0 <= save_prefix <= embeds.shape[1]:
            raise ValueError(f"save_prefix {save_prefix} for a {embeds.shape[1]}-token prompt")
        # the whole length's cache, held until the generation ends (or is dropped)
        reserved = dec.kv_bytes(need)
        dec.kv_budget.reserve(reserved, f"this request ({need} positions)")
        self.release = weakref.finalize(self, dec.kv_budget.release, reserved)
        self.io = dec.session.io_binding()
        self.io.bind_output("logits", "cpu")  # first: get_outputs() lists outputs in first-bind order
        if dec.has_keep:  # the last position's logits only (Decoder.logits rebinds it)
            self.io.bind_cpu_input(KEEP, dec.keep_last)
        self.kv: list[tuple[np.ndarray | None, np.ndarray | None]] = []  # numpy views of the buffers (CPU)
        if dec.shared_kv:  # bound once, for every step: past and present are the same buffers
            for pk, pv, ok, ov in dec.kv_names:
                (k, k_np), (v, v_np) = dec.kv_buffer(need), dec.kv_buffer(need)
                self.io.bind_ortvalue_input(pk, k)
                self.io.bind_ortvalue_input(pv, v)
                self.io.bind_ortvalue_output(ok, k)
                self.io.bind_ortvalue_output(ov, v)
                self.kv.append((k_np, v_np))
        else:
            self.past = [(dec.empty_past(), dec.empty_past()) for _ in range(dec.spec.num_layers)]
        self.length = 0  # tokens in the cache
        if prefix is not None:  # the prompt's first P positions, computed by an earlier generation
            n = prefix[0][0].shape[2]
            for (k_np, v_np), (k, v) in zip(self.kv, prefix):
                k_np[:, :, :n], v_np[:, :, :n] = k, v  # type: ignore[index]
            self.length = n
        self.reused_prefix = 0 if prefix is None else self.length
        self.save_prefix = save_prefix
        self.saved_prefix: tuple[tuple[np.ndarray, np.ndarray], ...] | None = None
        self.prefill_ms = 0.0
        self.decode_ms = 0.0  # decoder calls after prefill
        self.decode_steps = 0
        self.tokens: list[int] = []
        self.finish_reason: str | None = None

    def _run(self, embeds: np.ndarray, every_position: bool = False) -> np.ndarray:
        """One decoder call on [1, S, D]: updates the cache, returns last-position logits [V]
        (every_position: all of them, [S, V])."""
        dec, s, io = self.dec, embeds.shape[1], self.io
        io.bind_cpu_input("inputs_embeds", embeds)
        io.bind_cpu_input("attention_mask", dec.ones[:, : self.length + s])  # [1, past + S]
        if dec.has_position_ids:
            io.bind_cpu_input("position_ids", dec.positions[:, self.length : self.length + s])  # [1, S]
        io.bind_output("logits", "cpu")  # rebound each step: unallocated, so ORT sizes it for [1, S, V]
        if not dec.shared_kv:
            for (pk, pv, ok, ov), (k, v) in zip(dec.kv_names, self.past):
                io.bind_ortvalue_input(pk, k)
                io.bind_ortvalue_input(pv, v)
                io.bind_output(ok, dec.device)
                io.bind_output(ov, dec.device)
        dec.session.run_with_iobinding(io)
        outs = io.get_outputs()  # in bind order: logits first, then (copy) present k/v per layer
        if not dec.shared_kv:
            self.past = [(outs[1 + 2 * i], outs[2 + 2 * i]) for i in range(len(dec.kv_names))]
        self.length += s
        logits = outs[0].numpy()[0]  # [S, V]
        return logits if every_position else logits[-1]  # [S, V] or [V]

    def __iter__(self) -> Iterator[int]:
        p = self.params
        t0 = time.perf_counter()
        logits = self._run(self.embeds[:, self.length :])  # after a reused prefix: only the rest
        if self.save_prefix:
            n = self.save_prefix
            self.saved_prefix = tuple((k[:, :, :n].copy(), v[:, :, :n].copy()) for k, v in self.kv)  # type: ignore[index]
        self.prefill_ms = (time.perf_counter() - t0) * 1e3
        try:
            while True:
                tok = pick_token(logits, p.temperature, p.top_p, self.rng)
                if tok in p.stop_token_ids:
                    self.finish_reason = "stop"
                    return
                self.tokens.append(tok)
                yield tok  # the consumer's time is not counted as decode time
                if len(self.tokens) >= p.max_new_tokens:
                    self.finish_reason = "length"
                    return
                if self.stop_at is not None and time.monotonic() > self.stop_at:
                    self.finish_reason = "timeout"
                    raise GenerationTimeout(f"request timed out after {len(self.tokens)} tokens")
                t0 = time.perf_counter()
                self.step_embed[0, 0] = self.dec.table[tok]
                logits = self._run(self.step_embed)
                self.decode_ms += (time.perf_counter() - t0) * 1e3
                self.decode_steps += 1
        finally:
            if self.finish_reason is None:
                self.finish_reason = "stop"  # closed by the caller (a stop string)
            self.release()  # its KV memory back to the budget (once; the buffers go with self)


class TextStream:
    """Text deltas of a Generation, with stop strings: text that could still become a stop
    string is held back, and the answer is cut before the first stop string found."""

    def __init__(self, gen: Generation, tokenizer: Any, stop: Sequence[str] = ()) -> None:
        self.gen, self.tok, self.stop = gen, tokenizer, tuple(s for s in stop if s)
        self.text = ""  # emitted so far
        self.full = ""

    def __iter__(self) -> Iterator[str]:
        ids: list[int] = []
        for tok in self.gen:
            ids.append(tok)
            self.full = self.tok.decode(ids)
            cut = self._stop_at(self.full)
            if cut is not None:
                self.full = self.full[:cut]
                yield from self._emit(len(self.full))
                self.gen.finish_reason = "stop"
                return
            safe = len(self.full) - self._held(self.full)
            # an incomplete UTF-8 sequence decodes to trailing U+FFFD: wait for its other bytes
            safe = min(safe, len(self.full.rstrip("\ufffd")))
            yield from self._emit(safe)
        yield from self._emit(len(self.full))

    def _emit(self, upto: int) -> Iterator[str]:
        if upto > len(self.text):
            delta = self.full[len(self.text) : upto]
            self.text += delta
            yield delta

    def _stop_at(self, text: str) -> int | None:
        hits = [i for i in (text.find(s, max(0, len(self.text) - len(s))) for s in self.stop) if i >= 0]
        return min(hits) if hits else None

    def _held(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), 0, -1):
                if s.startswith(text[-n:]):
                    best = max(best, n)
                    break
        return best
