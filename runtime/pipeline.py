"""The torch-free pipeline: image(s) + question -> answer, at the budgets the deadline allows.

pipe = Pipeline.load("bundle/")                     # verifies hashes, picks a backend
r = pipe.ask(image, "What is this?", latency_ms=120)  # r.answer, r.budget, r.deadline_met
r = pipe.ask([older, newer], "What changed?", latency_ms=120)  # r.budgets: one per image, newest last
for delta in (s := pipe.stream(image, "Describe it.")):  # text deltas; s.result at the end
    print(delta, end="")
small, large = pipe.escalate(image, "Count the cars.", budgets=(9, 144))  # one vision pass

Keyword arguments build an AskOptions (runtime.options: latency_ms, tokens, objective, strict,
max_new_tokens, temperature, top_p, seed, stop, timeout_s); pass one as `options` to reuse it:
opts = AskOptions(latency_ms=120, max_new_tokens=16); pipe.ask(image, "What is this?", opts).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Generator, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fmvr.config import FMVRConfig
from fmvr.preprocess import Preprocessor
from fmvr.template import Turn
from fmvr.tokenizer import load_tokenizer, prompt_ids
from runtime.answer import Answer, Request, Result, VisionPass, build_result, measured_ms
from runtime.bundle import BundleError, Manifest, verify_bundle
from runtime.frame_input import blank_input, resolve, vision_input
from runtime.images import (
    as_images,
    check_context,
    encode_images,
    forced_choice,
    merge_features,
    per_image,
)
from runtime.llm import Decoder, Generation, SamplingParams, TextStream
from runtime.options import AskOptions, at_budget
from runtime.policy import QUANTILE, Choice, Policy
from runtime.prefix_cache import (
    DEFAULT_MB,
    TEXT_PREFIX_MB,
    PrefixCache,
    PrefixEntry,
    frame_digest,
    prefix_key,
    text_prefix_key,
)
from runtime.profile import Profile, ProfileError, device_info, load_profile, save_profile
from runtime.vision import VisionBackend, check_providers, load_backend

log = logging.getLogger("runtime")


def llm_target(m: Manifest) -> str:
    assert m.llm is not None
    return str(m.llm.quantization.get("target", "cpu"))


def decoder_providers(m: Manifest, vision_backend: str) -> list[str]:
    """The decoder's providers follow its quantization target (export --target), not the vision
    backend: a cpu-target int8/int4 decoder (MatMulNBits with accuracy_level 4, the CPU's kernel)
    may fail to create a CUDA session, and its fp32 GroupQueryAttention falls back to CPU; a
    cuda-target decoder goes to CUDA when onnxruntime has it and vision is not on CPU."""
    if llm_target(m) != "cuda" or vision_backend == "ort-cpu":
        return ["CPUExecutionProvider"]
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    log.warning("the decoder was exported for --target cuda, but this onnxruntime has no CUDA provider: CPU")
    return ["CPUExecutionProvider"]


@dataclass(frozen=True)
class PrefixPlan:
    """How one request's prefill uses the prefix caches (Pipeline._prefix_plan)."""

    start: Any  # KV state to start the prefill from (a cached frame or text prefix), or None
    save: int  # prompt positions to save after the prefill (0: none)
    text: int  # prompt positions before the first image (the text prefix's length)
    text_key: str | None  # the text prefix's key where it is to be saved from this prefill


class Pipeline:
    def __init__(
        self,
        bundle_dir: Path,
        manifest: Manifest,
        vision: VisionBackend,
        decoder: Decoder,
        tokenizer: Any,
        profile_if_missing: bool = False,
        quantile: float = QUANTILE,
        preprocess: str = "auto",
        prefix_cache_mb: float = DEFAULT_MB,
    ) -> None:
        self.bundle_dir, self.manifest = bundle_dir, manifest
        self.preprocess_mode = resolve(preprocess, manifest.vision.preprocess)  # graph | host
        self.cfg = FMVRConfig.from_dict(manifest.model["config"])
        self.budgets = tuple(t for t in sorted(manifest.budgets, reverse=True) if t in vision.budgets)
        if not self.budgets:
            raise BundleError(
                f"vision backend {vision.name} serves none of the bundle's budgets {manifest.budgets}"
            )
        self.vision, self.decoder, self.tokenizer = vision, decoder, tokenizer
        self.preprocessor = Preprocessor.from_dict(manifest.preprocessing)
        self.special = manifest.special_tokens
        self.quantile, self.profile_if_missing = quantile, profile_if_missing
        self.device = device_info(vision.provider)  # the provider, not the backend name
        # What the sessions actually got (a requested GPU provider missing is refused at load):
        session = getattr(decoder, "session", None)
        self.providers = {
            "vision": list(getattr(vision, "providers", [vision.provider])),
            "llm": list(session.get_providers()) if session is not None else [decoder.provider],
        }
        log.info("serving budgets %s with vision %s", list(self.budgets), vision.name)
        self.policy: Policy | None = None
        self.profile_note = ""
        self._profile_lock = threading.Lock()
        self._inflight = 0  # requests between stream() and the end of their answer
        self._inflight_lock = threading.Lock()
        # A frame's prompt prefix (up to its last visual token) computed once: follow-up questions
        # about the same frame and budget prefill only their own text (runtime.prefix_cache).
        reusable = getattr(decoder, "can_reuse_prefix", False)
        reuse = prefix_cache_mb > 0 and reusable
        self.prefix_cache = PrefixCache(int(prefix_cache_mb * 2**20)) if reuse else None
        # The prompt's text before the image (template and system prompt: ~22 tokens of ChatML) is
        # the same for every request of a client: its KV state is computed once and each request
        # prefills from the image on. Always on where the decoder can reuse a prefix (timing tools
        # included: every real request takes this path); a few entries, one per system prompt.
        self.text_prefix = PrefixCache(TEXT_PREFIX_MB * 2**20) if reusable else None
        self.reload_profile()

    # ---- loading -----------------------------------------------------------------------------
    @classmethod
    def load(
        cls,
        bundle: str | Path,
        backend: str = "auto",
        threads: int = 0,
        profile_if_missing: bool = False,
        quantile: float = QUANTILE,
        warmup: bool = False,
        preprocess: str = "auto",
        prefix_cache_mb: float = DEFAULT_MB,
        kv_cache_mb: float | None = None,
    ) -> Pipeline:
        """Verify the bundle (schema, sha256 of every file, engines vs this device) and load it.

        quantile: the fraction of deadlines the policy plans to keep (runtime.policy).
        warmup: run every budget once so the first request is not a cold start.
        preprocess: auto | graph (frames into a frame-input graph) | host (PIL first: exact).
        prefix_cache_mb: bound of the prefix cache (a frame's prompt prefix kept for follow-up
        questions; 0 disables it).
        kv_cache_mb: the KV memory budget of the requests running at once (None: the manifest's
        llm.kv_cache_mb; 0: no limit): a request over it alone is a ValueError, one that would
        fit once others finish a runtime.llm.KVCacheFull."""
        root = Path(bundle)
        m = verify_bundle(root)
        if m.llm is None:
            raise BundleError(
                f"bundle {root} has no LLM (vision-only); rebuild it with one: {m.rebuild_command()}"
            )
        vision = load_backend(root, m, backend, threads)
        providers = decoder_providers(m, vision.name)
        cfg = FMVRConfig.from_dict(m.model["config"])
        decoder = Decoder.load(root, m.llm, providers, cfg.text.max_position_embeddings, threads, kv_cache_mb)
        check_providers(decoder.session.get_providers(), providers[0], f"decoder {m.llm.decoder}")
        log.info(
            "LLM providers: %s (quantized for --target %s)", decoder.session.get_providers(), llm_target(m)
        )
        tok = load_tokenizer(root / m.tokenizer)
        pipe = cls(root, m, vision, decoder, tok, profile_if_missing, quantile, preprocess, prefix_cache_mb)
        if warmup:
            pipe.warmup()
        return pipe

    def reload_profile(self) -> None:
        try:
            prof = load_profile(self.bundle_dir, self.device, self.vision.name)
        except ProfileError as e:
            self.policy, self.profile_note = None, str(e)
            log.warning("%s", e)
            return
        self.use_profile(prof)

    def use_profile(self, prof: Profile) -> None:
        self.policy = Policy(prof, self.budgets, self.quantile)
        self.profile_note = f"profile {prof.key} ({prof.created})"

    def measure_profile(self, warmup: int = 2, runs: int = 5, save: bool = True) -> Profile:
        from runtime.measure import measure

        prof = measure(self, warmup=warmup, runs=runs)
        prof.providers = dict(self.providers)  # recorded, not part of the device key
        if save:
            path = save_profile(self.bundle_dir, prof)
            log.info("saved latency profile %s", path)
        self.use_profile(prof)
        return prof

    # ---- pieces ------------------------------------------------------------------------------
    def check_budget(self, tokens: int) -> int:
        """`tokens` if this bundle serves it, else a ValueError listing the budgets it does."""
        if tokens not in self.budgets:
            why = (
                f"served by the bundle's {self.vision.name} vision backend only at"
                if tokens in self.manifest.budgets
                else "not a budget of this bundle;"
            )
            raise ValueError(
                f"{tokens} visual tokens is {why} valid budgets: {', '.join(map(str, self.budgets))}"
            )
        return tokens

    def prompt_ids(self, prompt: str | Sequence[Turn], images: int = 1) -> list[int]:
        """Token ids of the rendered prompt with one placeholder per image (not yet expanded):
        fmvr.template.prompt_turns lays them out."""
        return prompt_ids(self.tokenizer, self.manifest.template, prompt, images, self.special.get("bos"))

    def preprocess(self, image: Any) -> np.ndarray:
        """Path, bytes or PIL image -> pixels [1, 3, S, S] (fmvr.preprocess.ImageError if unreadable)."""
        return self.preprocessor(image)  # [1, 3, S, S]

    def prepare(self, image: Any) -> np.ndarray:
        """The graphs' input: frames [1, H, W, 3] uint8 or pixels [1, 3, S, S] (runtime.frame_input)."""
        return vision_input(image, self.preprocess_mode, self.preprocessor, self.manifest.vision.preprocess)

    def encode(self, image: Any, budgets: Sequence[int]) -> VisionPass:
        """Preprocess + one vision pass of ONE image for every budget in `budgets`."""
        images = as_images(image)
        if len(images) != 1:
            raise ValueError("encode and escalate take one image: pass a list of images to ask or stream")
        for t in budgets:
            self.check_budget(t)
        (x,), pre_ms = self._timed_preprocess(images)
        t0 = time.perf_counter()
        feats = self.vision.encode(x, list(budgets))  # T -> [1, T, D]
        vis_ms = (time.perf_counter() - t0) * 1e3
        return VisionPass({t: f[0] for t, f in feats.items()}, pre_ms, vis_ms, self.vision.name)

    def _timed_preprocess(self, images: Sequence[Any]) -> tuple[list[np.ndarray], float]:
        t0 = time.perf_counter()
        xs = [self.prepare(im) for im in images]  # [1, 3, S, S] pixels or [1, H, W, 3] frames each
        return xs, (time.perf_counter() - t0) * 1e3

    def _vision_pass(self, inputs: Sequence[np.ndarray], budgets: Sequence[int], pre_ms: float) -> VisionPass:
        """Each image at its budget, batched where they share an input shape (runtime.images)."""
        t0 = time.perf_counter()
        feats, calls = encode_images(self.vision, inputs, budgets)  # [T_i, D] per image
        vis_ms = (time.perf_counter() - t0) * 1e3
        single = {budgets[0]: feats[0]} if len(feats) == 1 else {}
        return VisionPass(single, pre_ms, vis_ms, self.vision.name, feats, calls)

    def warmup(self) -> None:
        """One untimed pass through every budget and the decoder (first runs allocate)."""
        blank = blank_input(self.preprocessor, self.manifest.vision.preprocess)
        feats = self.vision.encode(blank, list(self.budgets))
        ids = self.prompt_ids("warm-up")
        for _ in self.decoder.start(self.embeddings(ids, feats[self.budgets[0]][0]), SamplingParams(2)):
            pass

    def embeddings(self, ids: Sequence[int], feats: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
        """Prompt embeddings [1, S, D] with each image's visual tokens ([T, D], or a list of
        [T_i, D] in prompt order) at its expanded placeholder."""
        image_id = self.special["image"]
        expanded, visual = merge_features(ids, [feats] if isinstance(feats, np.ndarray) else feats, image_id)
        is_image = expanded == image_id  # [S]
        x = self.decoder.embed(np.where(is_image, self.special["pad"], expanded))  # [1, S, D]
        x[0, is_image] = visual.astype(x.dtype)  # [sum T_i, D] in order
        return x

    def choose(
        self,
        opts: AskOptions,
        text_tokens: int,
        spent_ms: float | None = None,
        load: int = 0,
        images: int = 1,
        cached: dict[int, int] | None = None,
    ) -> Choice:
        """The budget of each of `images` images for `opts`: forced (`opts.tokens`), else the
        policy's pick for `opts.latency_ms` with `load` other requests in flight (`cached`: the
        budgets whose prefix the prefix cache holds for this frame, Policy.choose)."""
        forced = self.forced_budgets(opts, images)
        if forced is not None:
            return forced_choice(self.policy, forced, opts, text_tokens, spent_ms, load)
        if opts.latency_ms is not None and self.policy is None:
            self._profile_on_first_use()
        if self.policy is None:
            big = (self.budgets[0],) * images
            return Choice(big[-1], None, None, "no latency budget given: the largest budget", budgets=big)
        o = opts
        return self.policy.choose(
            o.latency_ms, text_tokens, o.max_new_tokens, o.objective, o.strict, spent_ms, load, images, cached
        )

    def forced_budgets(self, opts: AskOptions, images: int) -> tuple[int, ...] | None:
        """`opts.tokens` as one budget per image, each checked against the bundle (None: not forced)."""
        if opts.tokens is None:
            return None
        return tuple(self.check_budget(t) for t in per_image(opts.tokens, images))

    def _profile_on_first_use(self) -> None:
        if not self.profile_if_missing:
            raise ProfileError(
                f"a latency budget needs this device's profile: {self.profile_note}; "
                "or pass tokens=<budget> to force one"
            )
        with self._profile_lock:  # concurrent first requests measure once
            if self.policy is None:
                log.warning("no profile for this device: measuring one now (first use)")
                self.measure_profile()

    # ---- asking --------------------------------------------------------------------------------
    def ask(
        self, image: Any, prompt: str | Sequence[Turn], options: AskOptions | None = None, **kw: Any
    ) -> Result:
        """Answer in one go at the largest budget(s) whose predicted time fits `latency_ms`.

        image: a path, bytes, PIL image or frame (numpy array / fmvr.frames.Frame), or a list
        of them (in order, the newest last; one `<image>` placeholder each: runtime.images);
        prompt: a question or LLaVA turns
        [{"from": "human"|"gpt", "value": ...}]; options: an AskOptions, or its fields as
        keyword arguments (which replace those of `options`): latency_ms, tokens (force a
        budget: one for every image, or a list of one per image), objective ("ttft" | "total"),
        strict (DeadlineError when no budget fits, else the smallest with deadline_met=False),
        max_new_tokens, temperature, top_p, seed, stop (strings), timeout_s (GenerationTimeout
        past it). Bad values: OptionsError (a ValueError). The policy's rule for several images:
        runtime.policy (the newest largest, the others equal or one level smaller).
        """
        ans = self.stream(image, prompt, AskOptions.of(options, **kw))
        for _ in ans:
            pass
        assert ans.result is not None
        return ans.result

    def stream(
        self,
        image: Any,
        prompt: str | Sequence[Turn],
        options: AskOptions | None = None,
        *,
        waited_ms: float = 0.0,
        **kw: Any,
    ) -> Answer:
        """Preprocess, choose the budgets with the time left, encode, and stream the answer's
        text deltas (`.result` at the end). Options as in `ask`. `waited_ms`: time the request
        already spent before it got here (a server's queue); it counts against the deadline.
        A prompt that cannot fit the context is a runtime.images.ContextError (a ValueError)."""
        t_start = time.perf_counter()
        opts = AskOptions.of(options, **kw)
        images = as_images(image)
        load = self._enter()
        try:
            n = len(images)
            ids = self.prompt_ids(prompt, n)
            text, context = len(ids) - n, self.decoder.max_len
            planned = self.forced_budgets(opts, n) or (self.budgets[-1],) * n
            check_context(text, planned, opts.max_new_tokens, context)  # before any vision work
            inputs, pre_ms = self._timed_preprocess(images)
            scope = self._prefix_scope(inputs, ids)
            cached = self._cached_budgets(scope, ids) if opts.tokens is None else {}
            choice = self.choose(opts, text, waited_ms + pre_ms, load, n, cached)
            check_context(text, choice.budgets, opts.max_new_tokens, context)
            hit, key = self._cached_prefix(scope, choice.budget)
            if hit is not None:  # this frame at this budget was asked before: no vision pass
                f = hit.features
                vp = VisionPass({choice.budget: f}, pre_ms, 0.0, self.vision.name, images=[f], calls=0)
            else:
                vp = self._vision_pass(inputs, choice.budgets, pre_ms)
        except BaseException:
            self._leave()
            raise
        req = Request(
            vp, ids, choice, opts, t_start, load=load, waited_ms=waited_ms, prefix=hit, prefix_key=key
        )
        return Answer(self._answer(req), opts, choice.budget, on_done=self._leave, budgets=choice.budgets)

    @contextmanager
    def prefix_cache_off(self) -> Iterator[None]:
        """Within: every request computes its own prefix (timing tools ask one frame again and
        again and must measure the uncached path). Not for a pipeline serving other requests."""
        saved, self.prefix_cache = self.prefix_cache, None
        try:
            yield
        finally:
            self.prefix_cache = saved

    def _prefix_scope(
        self, inputs: Sequence[np.ndarray], ids: Sequence[int]
    ) -> tuple[Any, bytes, list[int]] | None:
        """(the frame, its digest, the prompt ids before the image) when the prefix cache can
        serve this request, else None (no cache, a decoder that cannot reuse a prefix, several
        images, or no text after the image). The frame is hashed once per request."""
        image = self.special["image"]
        reusable = getattr(self.decoder, "can_reuse_prefix", False)  # (a test may switch its KV mode)
        if self.prefix_cache is None or not reusable or len(inputs) != 1 or ids[-1] == image:
            return None
        return inputs[0], frame_digest(inputs[0]), list(ids[: list(ids).index(image)])

    def _cached_budgets(
        self, scope: tuple[Any, bytes, list[int]] | None, ids: Sequence[int]
    ) -> dict[int, int]:
        """{budget: text tokens after the image} for the budgets whose prefix for this frame and
        prompt start is in the prefix cache (empty when nothing can be reused)."""
        if scope is None or not self.prefix_cache:
            return {}
        frame, digest, before = scope
        held = [b for b in self.budgets if prefix_key(frame, b, before, digest) in self.prefix_cache]
        return {b: len(ids) - len(before) - 1 for b in held}

    def _cached_prefix(
        self, scope: tuple[Any, bytes, list[int]] | None, budget: int
    ) -> tuple[PrefixEntry | None, str | None]:
        """(the cached prefix of this frame, budget and prompt start, or None; its key, or None
        where nothing can be cached)."""
        if scope is None or self.prefix_cache is None:
            return None, None
        frame, digest, before = scope
        key = prefix_key(frame, budget, before, digest)
        return self.prefix_cache.get(key), key

    @property
    def inflight(self) -> int:
        """Requests running on this pipeline now (from stream() to the end of their answer)."""
        return self._inflight

    def _enter(self) -> int:
        """Count a new request in; returns how many others were in flight."""
        with self._inflight_lock:
            self._inflight += 1
            return self._inflight - 1

    def _leave(self) -> None:
        with self._inflight_lock:
            self._inflight -= 1

    def answer(
        self,
        vp: VisionPass,
        prompt: str | Sequence[Turn],
        tokens: int,
        options: AskOptions | None = None,
        **kw: Any,
    ) -> Result:
        """Re-answer from an earlier vision pass at one of its budgets (no second tower run).

        Options as in `ask`, less the budget choice: the answer is at `tokens`."""
        opts = at_budget(AskOptions.of(options, **kw), tokens, "answer")
        if tokens not in vp.features:
            raise ValueError(f"this vision pass holds budgets {sorted(vp.features)}, not {tokens}")
        ids = self.prompt_ids(prompt)
        choice = self.choose(opts, len(ids) - 1)
        ans = Answer(self._answer(Request(vp, ids, choice, opts, time.perf_counter(), True)), opts, tokens)
        for _ in ans:
            pass
        assert ans.result is not None
        return ans.result

    def escalate(
        self,
        image: Any,
        prompt: str | Sequence[Turn],
        budgets: Sequence[int] = (9, 144),
        options: AskOptions | None = None,
        **kw: Any,
    ) -> list[Result]:
        """Encode once for every budget, answer at each in order (smallest first). Options as in
        `ask`, less the budget choice (latency_ms, tokens, strict): the budgets are given."""
        opts = AskOptions.of(options, **kw)
        at_budget(opts, None, "escalate")
        if not self.vision.shared:
            raise BundleError(
                f"escalation needs the shared vision layout (one pass, every budget); backend "
                f"{self.vision.name} runs one graph per budget. Re-export: python -m export.onnx "
                f"--checkpoint CKPT --tokens all --layout shared --out {self.bundle_dir}"
            )
        order = sorted(budgets)
        vp = self.encode(image, order)
        results = []
        for i, t in enumerate(order):
            r = self.answer(vp, prompt, t, opts)
            if i == 0:  # the one vision pass is charged to the first answer
                r.measured_ms.update(preprocess=round(vp.preprocess_ms, 3), vision=round(vp.vision_ms, 3))
                r.measured_ms["ttft"] = round(r.measured_ms["ttft"] + vp.preprocess_ms + vp.vision_ms, 3)
                r.vision_reused = False
            results.append(r)
        return results

    def _params(self, opts: AskOptions) -> SamplingParams:
        stops = (self.special["eos"],)
        return SamplingParams(
            opts.max_new_tokens, opts.temperature, opts.top_p, opts.seed, stops, opts.stop
        ).check()

    def _answer(self, req: Request) -> Generator[str, None, Result]:
        """Decode at the chosen budget: yields text deltas, returns the Result."""
        feats = req.vp.images or [req.vp.features[req.choice.budget]]  # [T_i, D] per image
        embeds = self.embeddings(req.ids, feats)  # [1, S, D]
        params, timeout_s = self._params(req.opts), req.opts.timeout_s
        plan = self._prefix_plan(req)
        gen = self.decoder.start(
            embeds, params, timeout_s=timeout_s, prefix=plan.start, save_prefix=plan.save
        )
        text = TextStream(gen, self.tokenizer, params.stop)
        yield from text
        self._keep_prefix(req, plan, getattr(gen, "saved_prefix", None), feats[0])
        return self._result(req, gen, text, time.perf_counter())

    def _prefix_plan(self, req: Request) -> PrefixPlan:
        """Where the prefill starts and what it saves. A cached frame prefix (up to and including
        the image's last visual token) starts past the image; else the cached text before the
        image (template, system prompt) starts at the image. Saved: the frame prefix where the
        frame cache can keep it, else the text before the image when it is not cached yet."""
        if req.prefix is not None:
            return PrefixPlan(req.prefix.kv, 0, 0, None)
        if not getattr(self.decoder, "can_reuse_prefix", False) or self.special["image"] not in req.ids:
            return PrefixPlan(None, 0, 0, None)
        before = list(req.ids).index(self.special["image"])  # text positions before the first image
        key = text_prefix_key(req.ids[:before]) if self.text_prefix is not None and before else None
        hit = self.text_prefix.get(key) if self.text_prefix is not None and key is not None else None
        save = 0
        if req.prefix_key is not None and self.prefix_cache is not None:
            n = before + req.choice.budget
            save = n if self.decoder.kv_bytes(n) <= self.prefix_cache.max_bytes else 0  # too large: no copy
        if not save and hit is None and key is not None:
            save = before
        return PrefixPlan(None if hit is None else hit.kv, save, before, None if hit is not None else key)

    def _keep_prefix(self, req: Request, plan: PrefixPlan, saved: Any, features: np.ndarray) -> None:
        """Put what the prefill saved into the frame and text caches (plan: _prefix_plan's)."""
        if saved is None:
            return
        if self.prefix_cache is not None and req.prefix_key is not None and plan.save > plan.text:
            self.prefix_cache.put(req.prefix_key, PrefixEntry(features, saved))
        if self.text_prefix is not None and plan.text_key is not None:
            n = plan.text
            kv = tuple((k[:, :, :n].copy(), v[:, :, :n].copy()) for k, v in saved)
            self.text_prefix.put(plan.text_key, PrefixEntry(np.zeros((0,), np.float32), kv))

    def _result(self, req: Request, gen: Generation, text: TextStream, t_end: float) -> Result:
        measured = measured_ms(req, gen, t_end)
        # a prefix-cache hit's prefill is a fraction of the budget's: it would mislead the policy
        if self.policy is not None and not req.reused and req.prefix is None:
            self.policy.observe(req.choice.budgets, req.text_tokens, gen.decode_steps, measured, req.load)
        return build_result(req, gen, text.full, measured, self.decoder.provider)
