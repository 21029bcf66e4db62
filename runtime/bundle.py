"""The bundle schema: export writes it, the torch-free runtime reads and verifies it.

stdlib + numpy only (no torch, no onnx, no tensorrt). One schema, one version number.

Layout of a bundle directory (all paths in the manifest are relative to it, POSIX style):

    manifest.json
    vision/all.onnx                       layout "shared": one graph, every budget an output
    vision/t36.onnx ...                   layout "per-budget": one graph per budget
    vision/preprocess.onnx                frame-input bundles: the in-graph preprocessing alone
    vision/t36.fp16.engine + .engine.json TensorRT engine (plain bytes) + its sidecar
    llm/decoder.onnx (+ decoder.onnx.data) decoder over inputs_embeds + KV cache
    llm/embed_tokens.npy                  token-embedding table [vocab, hidden], dtype = inputs_embeds
    tokenizer/tokenizer.json

manifest.json (schema_version 3; version 2 bundles, without vision.preprocess, still load), keys:

- schema_version: int, one of READABLE_VERSIONS or the runtime refuses the bundle.
- created: ISO-8601 UTC time of the export.
- model: {name, config: FMVRConfig.to_dict(), config_hash: FMVRConfig.hash(), source: label}.
- budgets: [576, 144, 36, 9, 1] (the budgets this bundle serves, largest first).
- preprocessing: fmvr.preprocess.Preprocessor.to_dict() (size, mean, std; pad colour = mean).
- template: chat template name ("vicuna_v1" | "plain"), rendered by fmvr.template.
- special_tokens: {bos, eos, pad, image} token ids.
- vision (VisionSection):
    layout: "shared" | "per-budget"; input_name: "pixel_values"; input_dtype: "float32"
    | "float16"; image_size: 336; hidden_size: D (width of each visual token);
    budgets: {"36": {file: "vision/all.onnx", output: "tokens_36"}, ...} (keys are str(T));
    engines: {"36": EngineEntry{file, sidecar, precision, trt_version, gpu_name,
    compute_capability "8.7", profile {min_batch, opt_batch, max_batch}}} (possibly empty).
    Every ONNX graph: input pixel_values [batch, 3, S, S] -> output tokens_<T> [batch, T, D],
    or with vision.preprocess set: input frames uint8 [batch, height, width, 3] -> tokens_<T>.
    preprocess (GraphPreprocess, or null/absent: the host preprocesses with fmvr.preprocess):
    {where: "graph", input_name: "frames", dtype: "uint8", layout: "NHWC", channels: "RGB",
    max_height, max_width (the declared maximum frame), method (in words), graph:
    "vision/preprocess.onnx" (the same preprocessing alone: frames -> pixels_output
    "pixel_values" [batch, 3, S, S] float32), parity: {mean_abs_error, max_abs_error (0..255
    units), exact_fraction, per_image_mae, images, ok} of those pixels vs fmvr.preprocess at
    export}. Feature parity vs the PIL path per budget is each graph file's parity[T]["frames"].
- llm (LLMSection, or null for a vision-only bundle):
    decoder: "llm/decoder.onnx"; external_data: ["llm/decoder.onnx.data"] or [];
    embed_tokens: "llm/embed_tokens.npy" (its dtype is the decoder's inputs_embeds dtype);
    exporter: "torch-dynamo" (standard ops) | "onnxruntime-genai" (GroupQueryAttention etc.,
    com.microsoft contrib ops: onnxruntime only);
    num_layers, num_kv_heads, head_dim, hidden_size, vocab_size;
    past_key / past_value / present_key / present_value: name templates with "{i}"
    ("past_key_values.{i}.key", ..., "present.{i}.value"). Together with num_layers they
    are the IO contract: inputs inputs_embeds [B,S,H], attention_mask [B,P+S] int64,
    optional position_ids, the past KV [B, num_kv_heads, P, head_dim]; outputs logits and
    the present KV. runtime.llm.Decoder checks the graph against it when loading (the KV
    dtype and whether position_ids is an input are read from the graph itself);
    quant: "int4" | "int8" | "fp16" | "fp32" (the `--quant` value; export.quant's table);
    quantization: {method (what it is, in words), block_size (MatMulNBits block, null for
    fp16/fp32), accuracy_level (MatMulNBits; 4 = int8 activations in the CPU kernel, null
    where unset), target: "cpu"|"cuda", bytes, agreement: {status: "measured"|"not-run",
    reason, provider, top1, max_abs_logit_err, positions, prompts, floor, greedy_tokens (20),
    greedy_match, greedy_equal, ok}} (agreement: runtime.llm.Decoder vs PyTorch fp32 logits
    on a fixed text prompt set; "not-run" when the target's provider is absent, e.g. CUDA).
- tokenizer: "tokenizer/tokenizer.json".
- files: [FileEntry{path, sha256, bytes, role, precision, budgets, shapes {name: [dims]},
  parity {str(T): {max_abs, cosine, tolerance, images, reference} | ...}}]. Every file the
  runtime opens is listed here and hash-checked by verify_bundle.
- tools: {"torch": "2.13.0", "onnx": ..., "onnxruntime": ..., "python": ...}.
- build: {command: the `python -m export` command that rebuilds this bundle (generated
  from the options below), checkpoint: the source flags ("--checkpoint PATH" or
  "--demo-tiny"), vision: {layout, precision, opset, preprocess, max_frame}
  (export.options.VisionOptions),
  llm: {quant, target, exporter, block_size} (export.options.LLMOptions) or null}.

A TensorRT sidecar (vision/t36.fp16.engine.json) holds: trt_version, gpu_name,
compute_capability, precision, profile, engine_sha256, onnx_sha256, parity, latency_ms.
Engines are tied to the TensorRT version and GPU: `engine_mismatch` says when to rebuild.

Making a tiny bundle from another package's tests (needs torch; the export package):

    from export import build_tiny_bundle
    bundle_dir = build_tiny_bundle(out_dir, tokens="all", layout="shared", quant="fp32",
                                   force=False, seed=0)  # -> Path, an fp32 tiny bundle
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fmvr.atomic import atomic_dir, write_json

SCHEMA_VERSION = 3  # 3: vision.preprocess (frame input); 2: llm.quant, build options
READABLE_VERSIONS = (2, 3)  # a version 2 manifest is a version 3 one without vision.preprocess
MANIFEST_NAME = "manifest.json"
REBUILD_HINT = "python -m export --checkpoint CKPT --out BUNDLE --force"
LAYOUTS = ("shared", "per-budget")


class BundleError(ValueError):
    """A bundle that cannot be used: what is wrong, and the command that rebuilds it."""


# ---- schema ---------------------------------------------------------------------------------


@dataclass
class FileEntry:
    path: str
    sha256: str
    bytes: int
    role: str  # vision-onnx | vision-preprocess | vision-engine | engine-sidecar | llm-* | embed | tokenizer
    precision: str = ""
    budgets: list[int] = field(default_factory=list)
    shapes: dict[str, list[Any]] = field(default_factory=dict)
    parity: dict[str, Any] = field(default_factory=dict)


@dataclass
class VisionOutput:
    file: str
    output: str


@dataclass
class EngineEntry:
    file: str
    sidecar: str
    precision: str
    trt_version: str
    gpu_name: str
    compute_capability: str
    profile: dict[str, int] = field(default_factory=dict)


@dataclass
class GraphPreprocess:
    """Preprocessing inside the vision graphs: what they take and how they turn it into pixels."""

    input_name: str  # "frames"
    max_height: int
    max_width: int
    method: str
    dtype: str = "uint8"
    layout: str = "NHWC"
    channels: str = "RGB"
    pixels_output: str = "pixel_values"
    graph: str = ""  # "vision/preprocess.onnx": the preprocessing alone, frames -> pixels_output
    where: str = "graph"
    parity: dict[str, Any] = field(default_factory=dict)


@dataclass
class VisionSection:
    layout: str
    input_name: str
    input_dtype: str
    image_size: int
    hidden_size: int
    budgets: dict[str, VisionOutput]
    engines: dict[str, EngineEntry] = field(default_factory=dict)
    preprocess: GraphPreprocess | None = None  # None: pixels in, fmvr.preprocess on the host

    @property
    def frame_input(self) -> bool:
        """The graphs take uint8 frames and preprocess them themselves."""
        return self.preprocess is not None

    def output_for(self, tokens: int) -> VisionOutput:
        """The graph file and output name serving `tokens` (BundleError listing valid ones)."""
        if str(tokens) not in self.budgets:
            valid = ", ".join(sorted(self.budgets, key=int, reverse=True))
            raise BundleError(
                f"{tokens} visual tokens is not a budget of this bundle; valid budgets: {valid}"
            )
        return self.budgets[str(tokens)]


@dataclass
class LLMSection:
    decoder: str
    embed_tokens: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    quant: str  # int4 | int8 | fp16 | fp32
    external_data: list[str] = field(default_factory=list)
    exporter: str = "torch-dynamo"
    past_key: str = "past_key_values.{i}.key"
    past_value: str = "past_key_values.{i}.value"
    present_key: str = "present.{i}.key"
    present_value: str = "present.{i}.value"
    quantization: dict[str, Any] = field(default_factory=dict)
    # The KV memory budget: the caches of all generations running at once (runtime.llm.KVBudget);
    # 0: none recorded (bundles before it), no limit.
    kv_cache_mb: float = 0.0


@dataclass
class Manifest:
    model: dict[str, Any]
    budgets: list[int]
    preprocessing: dict[str, Any]
    template: str
    special_tokens: dict[str, int]
    vision: VisionSection
    tokenizer: str
    files: list[FileEntry]
    llm: LLMSection | None = None
    tools: dict[str, str] = field(default_factory=dict)
    build: dict[str, Any] = field(default_factory=dict)
    created: str = ""
    schema_version: int = SCHEMA_VERSION

    def file(self, path: str) -> FileEntry:
        for f in self.files:
            if f.path == path:
                return f
        raise BundleError(f"{path} is not listed in the manifest's files")

    def rebuild_command(self) -> str:
        return self.build.get("command") or REBUILD_HINT

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if d["vision"]["preprocess"] is None:  # host preprocessing: written as version 2 wrote it
            del d["vision"]["preprocess"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        d = dict(d)
        try:
            v = dict(d.pop("vision"))
            v["budgets"] = {k: VisionOutput(**x) for k, x in v["budgets"].items()}
            v["engines"] = {k: EngineEntry(**x) for k, x in v.get("engines", {}).items()}
            pre = v.pop("preprocess", None)
            v["preprocess"] = GraphPreprocess(**pre) if pre else None
            llm = d.pop("llm", None)
            files = [FileEntry(**f) for f in d.pop("files")]
            return cls(
                vision=VisionSection(**v),
                llm=LLMSection(**llm) if llm else None,
                files=files,
                **d,
            )
        except (KeyError, TypeError) as e:
            raise BundleError(
                f"manifest does not follow schema {SCHEMA_VERSION} ({type(e).__name__}: {e}); "
                f"rebuild the bundle: {REBUILD_HINT}"
            ) from e


# ---- files ------------------------------------------------------------------------------------


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_entry(bundle_dir: str | Path, rel: str, role: str, **meta: Any) -> FileEntry:
    """A FileEntry for bundle_dir/rel with its sha256 and size measured now."""
    p = Path(bundle_dir) / rel
    if not p.is_file():
        raise BundleError(f"cannot list {rel}: no such file in {bundle_dir}")
    return FileEntry(
        path=Path(rel).as_posix(), sha256=sha256_file(p), bytes=p.stat().st_size, role=role, **meta
    )


def write_manifest(bundle_dir: str | Path, manifest: Manifest) -> Path:
    """Write manifest.json atomically (also used to add engines to an existing bundle)."""
    path = Path(bundle_dir) / MANIFEST_NAME
    write_json(path, manifest.to_dict(), sort_keys=True)
    return path


def read_manifest(bundle_dir: str | Path) -> Manifest:
    """Parse manifest.json and check its schema version (hashes: see verify_bundle)."""
    path = Path(bundle_dir) / MANIFEST_NAME
    if not Path(bundle_dir).is_dir():
        raise BundleError(f"no bundle at {bundle_dir}: not a directory; build one with {REBUILD_HINT}")
    if not path.is_file():
        raise BundleError(f"{bundle_dir} is not a bundle: no {MANIFEST_NAME}; build one with {REBUILD_HINT}")
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise BundleError(f"{path} is not valid JSON ({e}); rebuild the bundle: {REBUILD_HINT}") from e
    version = d.get("schema_version") if isinstance(d, dict) else None
    if version not in READABLE_VERSIONS:
        cmd = (d.get("build") or {}).get("command") if isinstance(d, dict) else None
        raise BundleError(
            f"{path} has schema_version {version!r}; this runtime reads {SCHEMA_VERSION} "
            f"(and {', '.join(str(v) for v in READABLE_VERSIONS if v != SCHEMA_VERSION)}). "
            f"Re-export with the matching toolkit: {cmd or REBUILD_HINT}"
        )
    return Manifest.from_dict(d)


def verify_bundle(bundle_dir: str | Path) -> Manifest:
    """read_manifest + every listed file present with its size and sha256; referenced paths listed."""
    m = read_manifest(bundle_dir)
    root = Path(bundle_dir)
    for f in m.files:
        p = root / f.path
        if not p.resolve().is_relative_to(root.resolve()):
            raise BundleError(f"bundle {root}: file path {f.path!r} points outside the bundle; refusing it")
        if not p.is_file():
            raise BundleError(f"bundle {root}: {f.path} is missing; rebuild it: {m.rebuild_command()}")
        size = p.stat().st_size
        if size != f.bytes:
            raise BundleError(
                f"bundle {root}: {f.path} is {size} bytes, the manifest says {f.bytes} "
                f"(truncated or replaced); rebuild it: {m.rebuild_command()}"
            )
        if sha256_file(p) != f.sha256:
            raise BundleError(
                f"bundle {root}: {f.path} fails its sha256 check (corrupted or edited); "
                f"rebuild it: {m.rebuild_command()}"
            )
    listed = {f.path for f in m.files}
    for ref in referenced_paths(m):
        if ref not in listed:
            raise BundleError(
                f"bundle {root}: {ref} is used by the manifest but not hash-listed; rebuild it: {m.rebuild_command()}"
            )
    return m


def referenced_paths(m: Manifest) -> list[str]:
    """Every file a section points to (each must also be in m.files)."""
    refs = [o.file for o in m.vision.budgets.values()]
    if m.vision.preprocess is not None and m.vision.preprocess.graph:
        refs.append(m.vision.preprocess.graph)
    refs += [p for e in m.vision.engines.values() for p in (e.file, e.sidecar)]
    if m.llm is not None:
        refs += [m.llm.decoder, m.llm.embed_tokens, *m.llm.external_data]
    refs.append(m.tokenizer)
    return sorted(set(refs))


def engine_mismatch(
    entry: EngineEntry, trt_version: str, compute_capability: str, rebuild: str
) -> str | None:
    """None when the engine was built for this TensorRT + GPU, else why not and how to rebuild."""
    problems = []
    if entry.trt_version != trt_version:
        problems.append(f"built with TensorRT {entry.trt_version}, this device has {trt_version}")
    if entry.compute_capability != compute_capability:
        problems.append(
            f"built for compute capability {entry.compute_capability} ({entry.gpu_name}), "
            f"this GPU is {compute_capability}"
        )
    if not problems:
        return None
    return f"engine {entry.file}: " + "; ".join(problems) + f". Rebuild it on this device: {rebuild}"


def trt_rebuild_command(bundle_dir: str | Path, tokens: int, precision: str) -> str:
    flag = {"fp16": " --fp16", "int8": " --int8 --calib-images DIR"}.get(precision, "")
    return f"python -m export.trt --bundle {bundle_dir} --tokens {tokens}{flag}"


# ---- atomic bundle writing -----------------------------------------------------------------------


@contextlib.contextmanager
def atomic_bundle(out: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temp dir beside `out`; on success it becomes `out` (fmvr.atomic.atomic_dir).

    An exception (or Ctrl-C) removes the temp dir and leaves `out` as it was (absent, or the
    old bundle: a failed swap puts it back). The temp dir must hold manifest.json at the
    end. An existing `out` is refused unless force=True.
    """
    out = Path(out)
    check_output_free(out, force)
    with atomic_dir(out) as tmp:
        yield tmp
        if not (tmp / MANIFEST_NAME).is_file():
            raise BundleError(f"export did not write {MANIFEST_NAME}: bundle {out} not created")
        check_output_free(out, force)  # again: something may have appeared there meanwhile


def check_output_free(out: str | Path, force: bool) -> None:
    out = Path(out)
    if out.exists() and not force:
        raise BundleError(f"{out} already exists; choose another --out or pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise BundleError(f"{out} exists and is not a directory; remove it or choose another --out")
