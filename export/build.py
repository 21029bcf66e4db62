"""Assemble a bundle: vision graphs + decoder + tokenizer + manifest, written atomically."""

from __future__ import annotations

import re
import shlex
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from export.common import (
    ExportError,
    Progress,
    Source,
    human_bytes,
    parity_images,
    pixels_for,
    tiny_source,
    tool_versions,
)
from fmvr.checkpoint import swap_into_place
from runtime.bundle import (
    Manifest,
    atomic_bundle,
    file_entry,
    read_manifest,
    verify_bundle,
    write_manifest,
)

TOKENIZER = "tokenizer/tokenizer.json"


def rebuild_command(src: Source, out: str | Path, budgets: tuple[int, ...], layout: str, **flags: Any) -> str:
    """The `python -m export` command line that makes this bundle again (--force included)."""
    tokens = ",".join(map(str, budgets))
    cmd = (
        f"python -m export {src.checkpoint} --out {shlex.quote(str(out))} --tokens {tokens} --layout {layout}"
    )
    for name, value in flags.items():
        if value is True:
            cmd += f" --{name.replace('_', '-')}"
        elif value is not False:
            cmd += f" --{name.replace('_', '-')} {value}"
    return cmd + " --force"


def base_manifest(src: Source, budgets: tuple[int, ...], command: str) -> dict[str, Any]:
    """The manifest fields that come from the model config alone."""
    from fmvr.preprocess import Preprocessor

    cfg = src.model.cfg
    return {
        "model": {"name": cfg.name, "config": cfg.to_dict(), "config_hash": cfg.hash(), "source": src.label},
        "budgets": list(budgets),
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
        "build": {"command": command, "checkpoint": src.checkpoint},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def build_bundle(
    src: Source,
    out: str | Path,
    *,
    budgets: tuple[int, ...],
    layout: str = "shared",
    fp16: bool = False,
    opset: int = 18,
    llm: str | None = "int8",
    target: str = "cpu",
    exporter: str = "auto",
    block_size: int = 32,
    force: bool = False,
) -> tuple[Path, Manifest]:
    """Everything into `out` (temp dir + rename); returns (out, verified manifest)."""
    from export.llm import write_llm
    from export.onnx import write_vision

    out = Path(out)
    steps = Progress(4 if llm else 3)
    with atomic_bundle(out, force=force) as tmp:
        steps.start("preprocess parity images (real photos + built-in)")
        images, names = parity_images()
        pixels = pixels_for(src.model.cfg, images)  # [N, 3, S, S]
        steps.done(f"{len(names)} images")
        steps.start(
            f"vision ONNX ({layout}, budgets {', '.join(map(str, budgets))}, {'fp16' if fp16 else 'fp32'})"
        )
        vision, files = write_vision(src.model, tmp, budgets, layout, fp16, opset, pixels, names)
        worst = max(r["max_abs"] for f in files for r in f.parity.values())
        steps.done(f"parity ok, worst max abs error {worst:.2e}")
        llm_section = None
        if llm:
            steps.start(f"LLM decoder ({llm}, {target}, exporter {exporter})")
            llm_section, llm_files = write_llm(
                src.model, src.tokenizer, tmp, llm, target, exporter, block_size
            )
            files += llm_files
            steps.done(agreement_note(llm_section.quantization["agreement"]))
        steps.start("tokenizer, manifest, verification")
        (tmp / TOKENIZER).parent.mkdir(parents=True, exist_ok=True)
        src.tokenizer.save(str(tmp / TOKENIZER))
        files.append(file_entry(tmp, TOKENIZER, "tokenizer"))
        flags = {"fp16": fp16, "opset": opset, "llm": llm or "none"}
        if llm:
            flags.update(target=target, exporter=exporter, block_size=block_size)
        fields = base_manifest(src, budgets, rebuild_command(src, out, budgets, layout, **flags))
        manifest = Manifest(vision=vision, llm=llm_section, files=files, **fields)
        write_manifest(tmp, manifest)
        verify_bundle(tmp)
        steps.done()
    return out, verify_bundle(out)


def agreement_note(rec: dict[str, Any]) -> str:
    if rec.get("status") != "measured":
        return f"quality not measured: {rec.get('reason')}"
    return f"top-1 agreement {rec['top1']:.3f} (floor {rec['floor']}), greedy 20 equal: {rec['greedy_equal']}"


def add_llm(
    src: Source, bundle: str | Path, quant: str, target: str, exporter: str, block_size: int, force: bool
) -> tuple[Path, Manifest]:
    """Put (or with force, replace) the LLM of an existing bundle made from the same model."""
    from export.llm import write_llm

    bundle = Path(bundle)
    m = verify_bundle(bundle)
    if m.model.get("config_hash") != src.model.cfg.hash():
        raise ExportError(f"bundle {bundle} was exported from another model config; export into a new --out")
    if m.llm is not None and not force:
        raise ExportError(
            f"bundle {bundle} already has an LLM ({m.llm.quantization.get('method')}); pass --force"
        )
    work = Path(tempfile.mkdtemp(prefix=".llm.partial-", dir=bundle))
    try:
        section, files = write_llm(src.model, src.tokenizer, work, quant, target, exporter, block_size)
        swap_into_place(work / "llm", bundle / "llm")  # the old or the new decoder, never neither
    finally:
        shutil.rmtree(work, ignore_errors=True)
    m.files = [f for f in m.files if not f.path.startswith("llm/")] + files
    m.llm = section
    llm_flags = f" --llm {quant} --target {target} --exporter {exporter} --block-size {block_size}"
    pattern = r" --llm \S+( --target \S+)?( --exporter \S+)?( --block-size \S+)?"
    m.build["command"] = re.sub(pattern, llm_flags, m.build.get("command", ""))
    write_manifest(bundle, m)
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
    out_dir: str | Path, *, tokens: str = "all", layout: str = "shared", llm: str = "fp32", force: bool = False,
    seed: int = 0,
) -> Path:  # fmt: skip
    """An untrained tiny bundle (see export.build_tiny_bundle)."""
    from export.common import parse_tokens

    src = tiny_source(seed)
    budgets = parse_tokens(tokens, tuple(src.model.cfg.budgets))
    quant = None if llm == "none" else llm
    out, _ = build_bundle(
        src, out_dir, budgets=budgets, layout=layout, llm=quant, exporter="auto", force=force
    )
    return out


def existing_bundle(path: str | Path) -> bool:
    try:
        read_manifest(path)
    except ValueError:
        return False
    return True
