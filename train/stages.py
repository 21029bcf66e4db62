"""Training stages as data, and the training config (JSON file and/or flags).

| stage    | trainable                         | template  | lr   | start from            | runner |
|----------|-----------------------------------|-----------|------|-----------------------|--------|
| ground   | projector, pyramid, visual_norm   | (no text) | 1e-3 | fresh (or --init); regresses visual tokens onto word grids | train.ground:train |
| stage1   | projector, pyramid, visual_norm   | plain     | 1e-3 | fresh (or --init)     | train.loop:train |
| stage2   | projector, pyramid, language_model| the model's (vicuna_v1, chatml) | 2e-5 | --init stage-1 output | train.loop:train |
| finetune | projector, pyramid, language_model| the model's | 2e-5 | --init (required): an existing LLaVA checkpoint (M3's recipe) | train.loop:train |

Each `Stage` carries the function that runs it, `runner(cfg, resume=False) -> <out>/final`, named
"module:function" and imported when the stage runs (`Stage.run`): the runners' modules import this
one (for TrainConfig), so a direct reference would be an import circle; the name keeps the graph
one-way (train.loop, train.ground -> train.common -> train.stages). `python -m train` runs
`cfg.stage_def().run(cfg)` whatever the stage.

A stage's own knobs live in their own options record, a field of TrainConfig named by
`Stage.options` (stage ground: `TrainConfig.ground`, a `GroundOptions`); on the command line each
is a flag `--<record>-<knob>` (`--ground-position`), in a JSON config file a nested object
(`{"ground": {"position": true}}`), and it is refused with any other stage.

The vision tower is frozen unless --tower-lr > 0 (the authors' finetune.sh trains it at 2e-5;
its batch-norm statistics stay frozen). LoRA (`lora=true`) replaces full LLM training with peft adapters.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fmvr.cli import parse_tokens
from fmvr.config import PYRAMIDS
from fmvr.tasks.variants import VARIANTS

BENCH_KINDS = ("caption", "qa", "mix")  # mix: every question + a "Describe the image." caption block
PYRAMID_INITS = ("pooling", "released")  # a fresh model's FMVR stages (fmvr.pyramid.Pyramid.start_as_pooling)

Runner = Callable[..., Path]  # runner(cfg: TrainConfig, resume: bool = False) -> <out>/final


@dataclass(frozen=True)
class Stage:
    name: str
    parts: tuple[str, ...]  # top-level submodules of FMVRLlava that train
    template: str  # "chat": the model's own template (FMVRConfig.template)
    lr: float
    kind: str  # built-in benchmark records: "caption" (stage 1), "qa", or "ground" (box labels, no text)
    needs_init: bool = False
    runner: str = "train.loop:train"  # "module:function" that runs the stage (imported on use)
    options: str = ""  # the TrainConfig field holding this stage's own knobs ("": none)

    def runner_fn(self) -> Runner:
        """The runner function, imported now."""
        module, _, name = self.runner.partition(":")
        fn = getattr(importlib.import_module(module), name, None)
        if not callable(fn):
            raise ValueError(f"stage {self.name}: runner {self.runner!r} is not a function")
        return fn

    def run(self, cfg: TrainConfig, resume: bool = False) -> Path:
        """Run (or with `resume`, continue) this stage with `cfg`; returns <out>/final."""
        if cfg.stage != self.name:
            raise ValueError(f"stage {self.name} cannot run a config of stage {cfg.stage}")
        return self.runner_fn()(cfg, resume=resume)


STAGES: dict[str, Stage] = {
    "ground": Stage(
        "ground",
        ("projector", "pyramid", "visual_norm"),
        "plain",
        1e-3,
        "ground",
        runner="train.ground:train",
        options="ground",
    ),
    "stage1": Stage("stage1", ("projector", "pyramid", "visual_norm"), "plain", 1e-3, "caption"),
    "stage2": Stage("stage2", ("projector", "pyramid", "visual_norm", "language_model"), "chat", 2e-5, "qa"),
    "finetune": Stage(
        "finetune", ("projector", "pyramid", "visual_norm", "language_model"), "chat", 2e-5, "qa", True
    ),
}


@dataclass(frozen=True)
class GroundOptions:
    """Stage ground's own knobs (TrainConfig.ground; flags --ground-<knob>; see train.ground)."""

    position: bool = False  # the targets also name each token's layout cell ("top left")
    digit: bool = False  # the digit card's cells say " card" + the digit, not " card" alone


@dataclass(frozen=True)
class TrainConfig:
    """Every knob of a run; saved beside each checkpoint (train_config.json)."""

    stage: str = "stage2"
    out: str = "runs/train"
    preset: str = "tiny"
    pyramid: str = (
        ""  # "": fmvr for a fresh model, the checkpoint's with --init; else that cascade (swapped in)
    )
    pyramid_init: str = (
        "pooling"  # a fresh model's FMVR stages: pooling (each level = plain pooling) | released
    )
    visual_norm: bool = False  # a fresh model's visual tokens RMS-normed to the word-embedding scale
    init: str = ""  # checkpoint to start from (required for finetune)
    tokenizer: str = ""  # tokenizer.json (default: the init checkpoint's, or the tiny one)
    # data: a LLaVA JSON/JSONL file + image folder, or the built-in benchmark
    data: str = ""
    image_folder: str = "."
    bench_n: int = 800  # built-in benchmark training scenes (when no --data)
    bench_clips: int = 0  # built-in two-frame clips trained beside the scenes (the frames category)
    bench_seed: int = 0
    bench_variant: str = "easy"  # easy (3x3 layout, large objects) | detail (many small objects): fmvr.tasks
    bench_qa: str = "independent"  # independent (question blocks sharing the image) | conversation
    bench_kind: str = ""  # "": the stage's (caption for stage1, qa otherwise) | caption | qa | mix
    bench_questions: int = 0  # qa blocks per scene (0: all it supports; N: N of them, every category first)
    template: str = ""  # "": the stage's (plain for stage1, the model's otherwise) | plain | chat
    strict_data: bool = False
    max_length: int = 2048
    # optimisation
    lr: float = 0.0  # 0: the stage's default
    projector_lr: float = 0.0  # projector (+ pyramid unless --pyramid-lr); 0: --lr
    pyramid_lr: float = -1.0  # the FMVR blocks' own learning rate; 0: frozen; -1: as the projector's
    tower_lr: float = 0.0  # > 0: the vision tower trains too, at this lr (the authors' finetune.sh)
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    schedule: str = "cosine"  # cosine | constant
    epochs: float = 1.0
    steps: int = 0  # overrides epochs when > 0
    batch_size: int = 8  # per process, per micro-batch
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    budget_mode: str = "mean"  # mean (every budget each step) | random (one per step)
    tokens: str = ""  # comma-separated budgets to train ("" or "all": all of the model's)
    seed: int = 0
    tower_seed: int = 0  # a fresh model's frozen tower comes from this seed (-1: from --seed)
    # model tricks
    lora: bool = False
    lora_r: int = 64
    lora_alpha: int = 16
    bf16: bool = False
    fsdp: bool = False  # shard the LLM layers and the rest (tower excepted) with FSDP2 under torchrun
    grad_checkpointing: bool = False
    cache_vision: bool = False  # keep frozen-tower features in memory across epochs (small data only)
    # each stage's own knobs (Stage.options): a nested record
    ground: GroundOptions = dataclasses.field(default_factory=GroundOptions)
    # bookkeeping
    log_every: int = 1
    save_every: int = 0  # steps; 0: only at the end (and on Ctrl-C)
    keep_last: int = 2
    stop_after: int = 0  # stop (and save) after this many steps of this run: simulates an interruption
    progress: bool = True

    def __post_init__(self) -> None:
        for name, record in option_records().items():  # TrainConfig(**cfg.to_dict()) round-trips
            value = getattr(self, name)
            if not isinstance(value, record):
                object.__setattr__(self, name, _record(record, value, f"{name!r}"))

    def stage_def(self) -> Stage:
        if self.stage not in STAGES:
            raise ValueError(f"unknown stage {self.stage!r}; choose one of {sorted(STAGES)}")
        return STAGES[self.stage]

    def check(self) -> TrainConfig:
        st = self.stage_def()
        if st.needs_init and not self.init:
            raise ValueError(f"stage {self.stage} starts from an existing checkpoint: pass --init DIR")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule {self.schedule!r}: choose cosine or constant")
        if self.bench_qa not in ("independent", "conversation"):
            raise ValueError(f"bench qa {self.bench_qa!r}: choose independent or conversation")
        if self.bench_kind not in ("", *BENCH_KINDS):
            raise ValueError(f"bench kind {self.bench_kind!r}: choose one of {BENCH_KINDS}")
        if self.template not in ("", "plain", "chat"):
            raise ValueError(f"template {self.template!r}: choose plain or chat (the model's own template)")
        if self.bench_kind == "mix" and self.bench_qa != "independent":
            raise ValueError("--bench-kind mix needs --bench-qa independent (the caption is one more block)")
        if self.bench_questions < 0:
            raise ValueError(f"bench questions {self.bench_questions}: pass a count >= 0 (0: every question)")
        if self.bench_clips < 0:
            raise ValueError(f"bench clips {self.bench_clips}: pass a count >= 0")
        if self.bench_clips and (self.data or self.data_kind == "caption" or self.bench_qa != "independent"):
            raise ValueError(
                "--bench-clips adds two-frame question blocks to the built-in benchmark: use it without --data, "
                "with --bench-kind qa or mix and --bench-qa independent"
            )
        if st.kind == "ground" and (self.data or self.bench_clips or self.tower_lr):
            raise ValueError(
                f"stage {self.stage} regresses visual tokens onto the built-in benchmark's box labels with a "
                "frozen tower: drop --data, --bench-clips and --tower-lr"
            )
        for other in STAGES.values():
            if other.options and other.options != st.options:
                given = getattr(self, other.options)
                if given != type(given)():
                    raise ValueError(
                        f"--{other.options.replace('_', '-')}-* options apply to stage {other.name} only, "
                        f"not {self.stage}: drop them"
                    )
        if self.pyramid not in ("", *PYRAMIDS):
            raise ValueError(f"pyramid {self.pyramid!r}: choose one of {', '.join(PYRAMIDS)}")
        if self.bench_variant not in VARIANTS:
            raise ValueError(f"bench variant {self.bench_variant!r}: choose one of {', '.join(VARIANTS)}")
        if self.pyramid_lr < 0 and self.pyramid_lr != -1:
            raise ValueError(
                "--pyramid-lr must be >= 0 (0: the FMVR blocks stay frozen), or -1 (as --projector-lr)"
            )
        if self.pyramid_init not in PYRAMID_INITS:
            raise ValueError(f"pyramid init {self.pyramid_init!r}: choose one of {PYRAMID_INITS}")
        if self.budget_mode not in ("mean", "random"):
            raise ValueError(f"budget mode {self.budget_mode!r}: choose mean or random")
        if self.lora and "language_model" not in st.parts:
            raise ValueError("--lora applies to stages that train the language model (stage2, finetune)")
        if self.tower_lr < 0 or self.projector_lr < 0:
            raise ValueError("--tower-lr and --projector-lr must be >= 0 (0: frozen tower / same as --lr)")
        if self.tower_lr > 0 and self.cache_vision:
            raise ValueError("--cache-vision needs a frozen tower: drop it with --tower-lr")
        if self.fsdp and self.lora:
            raise ValueError("--fsdp with --lora is not supported: LoRA fits with plain DDP, drop --fsdp")
        if self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError("--batch-size and --grad-accum must be >= 1")
        if self.keep_last < 1:
            raise ValueError("--keep-last must be >= 1 (the checkpoint just written is always kept)")
        return self

    def budget_list(self, model_budgets: tuple[int, ...]) -> tuple[int, ...]:
        """The budgets a step draws from (--tokens), each checked against the model's."""
        return parse_tokens(self.tokens, model_budgets)

    @property
    def data_kind(self) -> str:
        """Built-in benchmark records this run trains on."""
        return self.bench_kind or self.stage_def().kind

    def template_for(self, model_template: str) -> str:
        """The conversation template of this run's data."""
        which = self.template or self.stage_def().template
        return model_template if which == "chat" else which

    @property
    def learning_rate(self) -> float:
        return self.lr or self.stage_def().lr

    def to_dict(self) -> dict[str, Any]:
        """Every field, options records as nested dicts (what train_config.json holds)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str = "the config") -> TrainConfig:
        """A config from `to_dict`'s form (missing fields: their defaults); unknown keys refused,
        naming `where`. Not checked: call .check()."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            flat = sorted(k for k in unknown if k.partition("_")[0] in option_records())
            hint = (
                f" ({', '.join(flat)}: a stage's own knobs are a nested object now, "
                f'e.g. {{"ground": {{"position": true}}}})'
                if flat
                else ""
            )
            raise ValueError(f"unknown keys {sorted(unknown)} in {where}{hint}; known: {sorted(known)}")
        values = dict(values)
        for name, record in option_records().items():
            if name in values and not isinstance(values[name], record):
                values[name] = _record(record, values[name], f"{where}: {name!r}")
        return cls(**values)

    @classmethod
    def from_sources(cls, file: str | None, overrides: dict[str, Any]) -> TrainConfig:
        """Defaults < JSON config file < explicit flags (None = not given). `overrides` are flat,
        named as flag_fields names them (an options record's knob: ground_position)."""
        cfg = cls.from_dict(json.loads(Path(file).read_text()), file) if file else cls()
        top: dict[str, Any] = {}
        for name, record, f in cls.flag_fields():
            if overrides.get(name) is None:
                continue
            if record:
                top.setdefault(record, {})[f.name] = overrides[name]
            else:
                top[name] = overrides[name]
        for record in option_records():
            if record in top:
                top[record] = dataclasses.replace(getattr(cfg, record), **top[record])
        return dataclasses.replace(cfg, **top).check()

    @classmethod
    def flag_fields(cls) -> list[tuple[str, str, dataclasses.Field]]:
        """(name, record, field) of every knob, in order: a plain field is (its name, "", it); an
        options record's knob is ("<record>_<knob>", record, the knob's field): flag --ground-position."""
        out: list[tuple[str, str, dataclasses.Field]] = []
        records = option_records()
        for f in dataclasses.fields(cls):
            if f.name in records:
                out += [(f"{f.name}_{g.name}", f.name, g) for g in dataclasses.fields(records[f.name])]
            else:
                out.append((f.name, "", f))
        return out


@functools.cache
def option_records() -> dict[str, type]:
    """{TrainConfig field: its options record class}, for the fields that are records (ground)."""
    hints = typing.get_type_hints(TrainConfig)
    return {
        f.name: hints[f.name]
        for f in dataclasses.fields(TrainConfig)
        if dataclasses.is_dataclass(hints[f.name])
    }


def _record(record: type, values: Any, where: str):
    """An options record from a JSON object, refusing what it does not know."""
    known = {f.name for f in dataclasses.fields(record)}
    if not isinstance(values, dict):
        raise ValueError(f"{where} must be an object with keys among {sorted(known)}, not {values!r}")
    unknown = set(values) - known
    if unknown:
        raise ValueError(f"unknown keys {sorted(unknown)} in {where}; known: {sorted(known)}")
    return record(**values)
