"""Assemble a bundle: tokenizer + vision graphs + decoder + manifest, written atomically.

Atomically means (fmvr.atomic, fmvr.staging): stale staging folders of killed exports are
swept, the estimate is checked against the free space before anything is written, the bundle
is built in a staging folder and put at --out in one step, so --out always holds the old
bundle or the new one; adding an LLM stages a hard-linked copy whose llm/ and manifest change
together.

Each part is gated through the runtime's own loaders (export.gates) inside the temporary
bundle before it becomes the bundle. The manifest stores the options it was made with and
the rebuild command generated from them.
"""

from __future__ import annotations

import shlex
import time
from pathlib import Path
from typing import Any

from export import gates
from export.common import (
    ExportError,
    Progress,
    Source,
    human_bytes,
    parity_images,
    tiny_source,
    tool_versions,
)
from export.decoder import write_llm
from export.graphs import write_vision
from export.options import (
    DEFAULT_LLM,
    DEFAULT_VISION,
    LLMOptions,
    VisionOptions,
    build_record,
    options_from_build,
)
from fmvr import staging
from fmvr.atomic import update_dir
from fmvr.staging import fault_point
from runtime.bundle import (
    FileEntry,
    LLMSection,
    Manifest,
    atomic_bundle,
    check_output_free,
    file_entry,
    read_manifest,
    verify_bundle,
    write_manifest,
)

TOKENIZER = "tokenizer/tokenizer.json"


def base_manifest(src: Source, tokens: tuple[int, ...], build: dict[str, Any]) -> dict[str, Any]:
    """The manifest fields that come from the model config and the options alone."""
    from fmvr.preprocess import Preprocessor

    cfg = src.model.cfg
    return {
        "model": {"name": cfg.name, "config": cfg.to_dict(), "config_hash": cfg.hash(), "source": src.label},
        "budgets": list(tokens),
        "preprocessing": Preprocessor.from_config(cfg).to_dict(),
        "template": cfg.template,
        # "bos" only when prompts start with it (ChatML models have none)
        "special_tokens": {
            **({} if cfg.bos_id is None else {"bos": cfg.bos_id}),
            "eos": cfg.eos_token_id,
            "pad": cfg.pad_token_id,
            "image": cfg.image_token_id,
        },
        "tokenizer": TOKENIZER,
        "tools": tool_versions(),
        "build": build,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def build_bundle(
    src: Source,
    out: str | Path,
    *,
    tokens: tuple[int, ...],
    vision: VisionOptions = DEFAULT_VISION,
    llm: LLMOptions | None = DEFAULT_LLM,
    force: bool = False,
) -> tuple[Path, Manifest]:
    """Everything into `out` (temp dir, swapped in at the end); returns (out, verified manifest).

    llm=None: a vision-only bundle."""
    out = Path(out)
    steps = Progress(4 if llm else 3)
    build = build_record(src.flags, out, tokens, vision, llm)
    check_output_free(out, force)  # the plain refusal first
    staging.sweep(out)
    staging.check_space(out, export_bytes(src.model, tokens, vision, llm), f"bundle {out.name}")
    with atomic_bundle(out, force=force) as tmp:
        steps.start("parity images (real photos + built-in)")
        images, names = parity_images()
        steps.done(f"{len(names)} images")
        where = "in the graph, frames in" if vision.frame_input else "on the host, pixels in"
        steps.start(
            f"vision ONNX ({vision.layout}, budgets {', '.join(map(str, tokens))}, {vision.precision}, "
            f"preprocessing {where})"
        )
        section, files = write_vision(src.model, tmp, tokens, vision)
        files.append(write_tokenizer(src, tmp))
        write_manifest(tmp, Manifest(vision=section, files=files, **base_manifest(src, tokens, build)))
        m = gates.vision_gate(tmp, src.model, images, names)
        write_manifest(tmp, m)
        steps.done(vision_note(m))
        fault_point("export.after-vision")
        if llm:
            steps.start(f"LLM decoder ({llm.quant}, {llm.target}, exporter {llm.exporter})")
            llm_section, llm_files = write_llm(src.model, src.tokenizer, tmp, llm)
            m.llm, m.files = llm_section, m.files + llm_files
            write_manifest(tmp, m)
            m = verify_bundle(tmp)
            assert m.llm is not None
            record_quality(m.llm, m.files, gates.llm_gate(tmp, m.llm, src.model, src.tokenizer, llm.target))
            steps.done(agreement_note(m.llm.quantization["agreement"]))
            fault_point("export.after-llm")
        steps.start("manifest, verification")
        write_manifest(tmp, m)
        verify_bundle(tmp)
        steps.done()
    return out, verify_bundle(out)


BYTES = {"fp32": 4, "fp16": 2, "int8": 1, "int4": 0.5}


def export_bytes(model: Any, tokens: tuple[int, ...], vision: VisionOptions, llm: LLMOptions | None) -> int:
    """An upper estimate of what build_bundle writes at its peak: the vision graphs (vision
    params x bytes per precision, once per graph) + the decoder's float export and its quantized
    copy side by side + the embedding table + 16 MB of tokenizer and small files."""
    text = model.language_model
    text_params = sum(p.numel() for p in text.parameters())
    vision_params = sum(p.numel() for p in model.parameters()) - text_params
    graphs = 1 if vision.layout == "shared" else len(tokens)
    need = vision_params * BYTES[vision.precision] * graphs + (16 << 20)
    if llm is not None:
        q = llm.quantization
        embed = text.get_input_embeddings().weight.numel() * BYTES[q.export_precision]
        need += text_params * (BYTES[q.export_precision] + BYTES.get(llm.quant, 4)) + embed
    return int(need)


def vision_note(m: Manifest) -> str:
    worst = max(r["max_abs"] for f in m.files for r in f.parity.values())
    note = f"parity through runtime.vision ok, worst max abs error {worst:.2e}"
    if m.vision.preprocess is None:
        return note
    cos = min(r["frames"]["min_cosine"] for f in m.files for r in f.parity.values() if "frames" in r)
    return f"{note}; in-graph preprocessing: {m.vision.preprocess.parity['summary']}, feature cosine >= {cos:.6f}"


def write_tokenizer(src: Source, root: Path) -> FileEntry:
    (root / TOKENIZER).parent.mkdir(parents=True, exist_ok=True)
    src.tokenizer.save(str(root / TOKENIZER))
    return file_entry(root, TOKENIZER, "tokenizer")


def record_quality(section: LLMSection, files: list[FileEntry], record: dict[str, Any]) -> None:
    """The LLM gate's record: in llm.quantization.agreement and the decoder file's parity."""
    section.quantization["agreement"] = record
    next(f for f in files if f.path == section.decoder).parity = {"quality": record}


def agreement_note(rec: dict[str, Any]) -> str:
    if rec.get("status") != "measured":
        return f"quality not measured: {rec.get('reason')}"
    sets = "".join(f"; {k} {v['top1']:.3f}" for k, v in rec.get("sets", {}).items())
    return (
        f"top-1 agreement {rec['top1']:.3f} (floor {rec['floor']}), greedy 20 equal: {rec['greedy_equal']}"
        + (f" (recorded top-1{sets})" if sets else "")
    )


def add_llm(src: Source, bundle: str | Path, llm: LLMOptions, force: bool) -> tuple[Path, Manifest]:
    """Put (or with force, replace) the LLM of an existing bundle made from the same model."""
    bundle = Path(bundle)
    m = verify_bundle(bundle)
    if m.model.get("config_hash") != src.model.cfg.hash():
        raise ExportError(f"bundle {bundle} was exported from another model config; export into a new --out")
    if m.llm is not None and not force:
        raise ExportError(f"bundle {bundle} already has an LLM ({m.llm.quant}); pass --force")
    vision, _ = options_from_build(m.build)
    need = export_bytes(src.model, tuple(m.budgets), vision, llm) - export_bytes(src.model, (), vision, None)
    # the new llm/ and the manifest replace the old ones together: one step (fmvr.atomic.update_dir)
    with update_dir(
        bundle, skip=("llm", "llm.work"), need=need, what=f"the LLM of bundle {bundle.name}"
    ) as work:
        section, files = write_llm(src.model, src.tokenizer, work, llm)
        record_quality(section, files, gates.llm_gate(work, section, src.model, src.tokenizer, llm.target))
        m.files = [f for f in m.files if not f.path.startswith("llm/")] + files
        m.llm = section
        m.build = build_record(shlex.split(m.build["checkpoint"]), bundle, tuple(m.budgets), vision, llm)
        write_manifest(work, m)
        verify_bundle(work)
        fault_point("export.llm-staged")
    return bundle, verify_bundle(bundle)


def summary_rows(m: Manifest) -> list[tuple[str, str, str, str, str]]:
    rows = []
    for f in m.files:
        budgets = ",".join(map(str, f.budgets)) if f.budgets else "-"
        rows.append((f.path, budgets, f.precision or "-", human_bytes(f.bytes), parity_note(f.parity)))
    return rows


def parity_note(parity: dict[str, Any]) -> str:
    if not parity:
        return "-"
    if "quality" in parity:
        return agreement_note(parity["quality"]).split(",")[0]
    worst = max(parity.values(), key=lambda r: r["max_abs"])
    return f"max abs {worst['max_abs']:.1e}, cos {min(r['cosine'] for r in parity.values()):.6f}"


def print_summary(out: Path, m: Manifest) -> None:
    rows = [("file", "budget", "precision", "size", "parity vs PyTorch"), *summary_rows(m)]
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    print(f"\nbundle {out} (schema {m.schema_version}, model {m.model['name']}, {m.model['source']}):")
    for i, r in enumerate(rows):
        print("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        if i == 0:
            print("  " + "  ".join("-" * w for w in widths))
    print(f"  total {human_bytes(sum(f.bytes for f in m.files))}; verified: every sha256 matches")


def build_tiny(
    out_dir: str | Path,
    *,
    tokens: str = "all",
    layout: str = "shared",
    quant: str | None = "fp32",
    force: bool = False,
    seed: int = 0,
    preprocess: str = "graph",
) -> Path:
    """An untrained tiny bundle (see export.build_tiny_bundle)."""
    from export.common import parse_tokens

    src = tiny_source(seed)
    budgets = parse_tokens(tokens, tuple(src.model.cfg.budgets))
    llm = None if quant in (None, "none") else LLMOptions(quant=quant)
    out, _ = build_bundle(
        src,
        out_dir,
        tokens=budgets,
        vision=VisionOptions(layout=layout, preprocess=preprocess),
        llm=llm,
        force=force,
    )
    return out


def existing_bundle(path: str | Path) -> bool:
    try:
        read_manifest(path)
    except ValueError:
        return False
    return True
