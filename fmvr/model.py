"""FMVR-LLaVA: vision tower -> projector -> Matryoshka pyramid -> causal LM.

pixels [B,3,H,W] -> tower grid features (fmvr.towers)  [B,N,Dv] (Dv = vision.hidden_size x maps)
                 -> projector                          [B,N,D]
                 -> pyramid at budget T                [B,T,D]
                 -> T placeholder positions of the prompt's embeddings
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fmvr.config import FMVRConfig, TextConfig, feature_width
from fmvr.pyramid import Pyramid
from fmvr.tokenizer import IGNORE_INDEX


def text_config(t: TextConfig, cfg: FMVRConfig):
    from transformers import AutoConfig

    return AutoConfig.for_model(
        t.arch,
        hidden_size=t.hidden_size,
        num_hidden_layers=t.num_layers,
        num_attention_heads=t.num_heads,
        num_key_value_heads=t.num_kv_heads,
        intermediate_size=t.intermediate_size,
        vocab_size=t.vocab_size,
        max_position_embeddings=t.max_position_embeddings,
        rms_norm_eps=t.rms_norm_eps,
        rope_theta=t.rope_theta,
        tie_word_embeddings=t.tie_word_embeddings,
        bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id,
        pad_token_id=cfg.pad_token_id,
    )


class Projector(nn.Module):
    """mlp2x_gelu (LLaVA-1.5), ln_mlp2x_gelu (a LayerNorm first, as InternVL's connector: for
    towers whose feature maps differ in scale, e.g. EfficientNet's 112- and 1280-channel maps),
    or the authors' cross-layer fusion + wide MLP."""

    def __init__(self, cfg: FMVRConfig) -> None:
        super().__init__()
        dv, dt = feature_width(cfg), cfg.text.hidden_size
        self.norm = nn.LayerNorm(dv) if cfg.projector == "ln_mlp2x_gelu" else None
        self.crosslayer: nn.Sequential | None = None
        if cfg.projector == "crosslayer":
            dv = cfg.vision.hidden_size
            n = len(cfg.vision.feature_layers)
            self.crosslayer = nn.Sequential(nn.Linear(n * dv, dt), nn.GELU(), nn.Linear(dt, dv))
        # LLaVA-1.5's mlp2x_gelu is dt wide; the authors' release widens it (projector_hidden).
        hidden = cfg.projector_hidden or dt
        self.mlp = nn.Sequential(nn.Linear(dv, hidden), nn.GELU(), nn.Linear(hidden, dt))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:  # [B, N, Dv*layers] -> [B, N, D]
        if self.norm is not None:
            feats = self.norm(feats)  # [B, N, Dv]
        if self.crosslayer is not None:
            feats = self.crosslayer(feats)  # [B, N, Dv]
        return self.mlp(feats)


class VisualNorm(nn.Module):
    """RMS norm of each visual token with a learnable gain [D], initialised (`reset`) to the
    LM's word-embedding RMS, so visual tokens enter the LM at the scale of text tokens."""

    def __init__(self, width: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = eps

    @torch.no_grad()
    def reset(self, word_embeddings: torch.Tensor) -> None:
        """Gain = the RMS of the word-embedding table [V, D] (one number for every channel)."""
        self.weight.fill_(float(word_embeddings.float().pow(2).mean().sqrt()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, D] -> [B, T, D]
        rms = x.float().pow(2).mean(-1, keepdim=True).add(self.eps).rsqrt()  # [B, T, 1]
        return (x.float() * rms).to(x.dtype) * self.weight.to(x.dtype)


class FMVRLlava(nn.Module):
    def __init__(self, cfg: FMVRConfig) -> None:
        super().__init__()
        from transformers import AutoModelForCausalLM

        from fmvr.towers import build_tower

        self.cfg = cfg.validate()
        self.vision_tower = build_tower(cfg.vision)
        self.projector = Projector(cfg)
        self.pyramid = Pyramid(cfg)
        self.language_model = AutoModelForCausalLM.from_config(text_config(cfg.text, cfg))
        self.visual_norm = VisualNorm(cfg.text.hidden_size) if cfg.visual_norm else None
        self.reset_visual_norm()

    def reset_visual_norm(self) -> None:
        """Start the visual-norm gain at the LM's current word-embedding scale (no-op without it)."""
        if self.visual_norm is not None:
            self.visual_norm.reset(self.language_model.get_input_embeddings().weight)

    # ---- vision ------------------------------------------------------------------------
    def encode_grid(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Tower + projector: pixels [B,3,H,W] -> the full projected grid [B, N, D]."""
        return self.projector(self.vision_tower(pixel_values))  # [B, N, Dv] -> [B, N, D]

    def encode_image(self, pixel_values: torch.Tensor, tokens: int) -> torch.Tensor:
        """pixels [B,3,H,W] -> visual tokens [B, tokens, D] at one budget."""
        self.pyramid.check(tokens)
        return self.visual_tokens(self.encode_grid(pixel_values), (tokens,))[tokens]

    def encode_budgets(self, pixel_values: torch.Tensor, budgets: tuple[int, ...]) -> dict[int, torch.Tensor]:
        """One tower pass, every requested budget: {T: [B, T, D]}."""
        return self.visual_tokens(self.encode_grid(pixel_values), budgets)

    def visual_tokens(self, grid: torch.Tensor, budgets: tuple[int, ...]) -> dict[int, torch.Tensor]:
        """Projected grid [B, N, D] -> {T: [B, T, D]}: the pyramid, then the visual norm if configured."""
        out = self.pyramid.forward_many(grid, budgets)  # {T: [B, T, D]}
        if self.visual_norm is not None:
            out = {t: self.visual_norm(v) for t, v in out.items()}
        return out

    # ---- language ----------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor, image_features: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings with the placeholder positions replaced by visual tokens, in order.

        input_ids [B, S]; image_features [I, T, D]: I images in row order (row 0's images first),
        each filling T consecutive placeholders. With I == B every row holds exactly one image
        (T placeholders); otherwise each row holds a whole number of images and all I are used.
        """
        embeds = self.language_model.get_input_embeddings()
        is_image = input_ids == self.cfg.image_token_id  # [B, S]
        safe_ids = input_ids.masked_fill(is_image, self.cfg.pad_token_id)
        x = embeds(safe_ids)  # [B, S, D]
        if image_features is None:
            if is_image.any():
                raise ValueError("prompt has image placeholders but no image features were given")
            return x
        n_images, t, _ = image_features.shape
        counts = is_image.sum(dim=1)  # [B]
        if n_images == input_ids.shape[0]:  # one image per row
            bad = bool((counts != t).any())
        else:  # several per row: whole images, all of them used
            bad = bool((counts % t).any()) or int(counts.sum()) != n_images * t
        if bad:
            raise ValueError(
                f"each of the {n_images} image(s) needs exactly {t} image placeholder positions (the budget); "
                f"the prompts hold {counts.tolist()}: expand every <image> placeholder with "
                "fmvr.tokenizer.expand_image_tokens(ids, image_token_id, tokens)"
            )
        x = x.clone()
        x[is_image] = image_features.reshape(n_images * t, -1).to(x.dtype)  # row-major, in order
        return x

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        tokens: int | None = None,
        image_features: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ):
        """LM forward with the image at `tokens`; loss (shifted CE) when labels are given."""
        if image_features is None and pixel_values is not None:
            if tokens is None:
                raise ValueError("pass tokens=<budget> with pixel_values")
            image_features = self.encode_image(pixel_values, tokens)
        inputs_embeds = self.embed(input_ids, image_features)
        if labels is not None:
            labels = labels.masked_fill(input_ids == self.cfg.image_token_id, IGNORE_INDEX)
        return self.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels)

    @torch.no_grad()
    def generate(
        self,
        pixel_values: torch.Tensor | None,
        input_ids: torch.Tensor,
        tokens: int,
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        attention_mask: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
    ) -> list[list[int]]:
        """Answer ids per row of input_ids [B, S] (placeholders expanded to `tokens`, left-padded
        where attention_mask [B, S] is 0), the images given as pixels [B*n, 3, H, W] or as their
        visual tokens image_features [B*n, T, D]. Greedy when temperature == 0, else temperature +
        top-p sampling with `seed`. Each row stops at eos (not returned) or after max_new_tokens."""
        if image_features is None:
            if pixel_values is None:
                raise ValueError("pass pixel_values or image_features")
            image_features = self.encode_image(pixel_values, tokens)  # [B*n, T, D]
        embeds = self.embed(input_ids, image_features)  # [B, S, D]
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        return decode(
            self.language_model,
            embeds,
            mask,
            None,
            max_new_tokens,
            self.cfg.eos_token_id,
            temperature,
            top_p,
            gen,
        )

    def with_cascade(self, pyramid: str) -> None:
        """Swap the visual-token cascade (fmvr | m3 | none) for a fresh one of that kind; the
        tower, projector and LM keep their weights (a plain-LLaVA checkpoint adapted to FMVR)."""
        self.cfg = self.cfg.with_pyramid(pyramid).validate()
        self.pyramid = Pyramid(self.cfg)

    def trainable(self, parts: tuple[str, ...]) -> None:
        """Freeze everything but `parts` (names of submodules: projector, pyramid, language_model)."""
        for name, p in self.named_parameters():
            p.requires_grad_(name.split(".")[0] in parts)


@torch.no_grad()
def decode(
    lm: nn.Module,
    embeds: torch.Tensor,
    mask: torch.Tensor,
    past: Any = None,
    max_new_tokens: int = 32,
    eos_id: int | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    gen: torch.Generator | None = None,
) -> list[list[int]]:
    """The one torch decoding loop (the model's generate, train.eval, export's gates): new ids per
    row after embeds [B, S, D] under mask [B, P+S] (0 = left padding; P = the cached length of
    `past`), positions counted over real tokens only. A row stops at eos_id (not returned);
    eos_id None: always max_new_tokens."""
    rows = embeds.shape[0]
    answers: list[list[int]] = [[] for _ in range(rows)]
    done = [False] * rows
    for _ in range(max_new_tokens):
        pos = (mask.cumsum(1) - 1).clamp(min=0)[:, -embeds.shape[1] :]  # [B, S] positions over real tokens
        out = lm(
            inputs_embeds=embeds, attention_mask=mask, position_ids=pos, past_key_values=past, use_cache=True
        )
        past = out.past_key_values
        nxt = [pick_token(out.logits[r, -1], temperature, top_p, gen) for r in range(rows)]
        for r, token in enumerate(nxt):
            if not done[r]:
                done[r] = token == eos_id
                if not done[r]:
                    answers[r].append(token)
        if all(done):
            break
        mask = torch.cat([mask, mask.new_ones(rows, 1)], dim=1)  # [B, P+S+1]
        embeds = lm.get_input_embeddings()(torch.tensor(nxt)[:, None])  # [B, 1, D]
    return answers


def pick_token(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator | None) -> int:
    """Greedy argmax, or a temperature/top-p sample from the last-position logits [V]."""
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    sorted_p, order = probs.sort(descending=True)
    keep = sorted_p.cumsum(0) - sorted_p < top_p  # always keeps the top token
    sorted_p = sorted_p * keep
    choice = torch.multinomial(sorted_p / sorted_p.sum(), 1, generator=gen)
    return int(order[choice])


def build_model(cfg: FMVRConfig, seed: int = 0, pretrained: bool = True) -> FMVRLlava:
    """A freshly initialised model, deterministic for `seed`, in eval mode; with `pretrained`,
    the tower and LM weights named by the config (pip packages) replace the random ones."""
    torch.manual_seed(seed)
    model = FMVRLlava(cfg).eval()
    if pretrained:
        load_pretrained(model)
    return model


def load_pretrained(model: FMVRLlava) -> list[str]:
    """Load the packaged weights the config names (`vision.weights`, `text.weights`); returns
    the parts loaded. Projector and pyramid keep their fresh initialisation; the visual norm's
    gain starts at the loaded word embeddings' scale."""
    loaded = []
    v, t = model.cfg.vision, model.cfg.text
    if v.weights:
        from fmvr.towers import load_effnet_pretrained

        load_effnet_pretrained(model.vision_tower)
        loaded.append("vision_tower")
    if t.weights:
        from fmvr.smollm import text_state

        lm = model.language_model
        missing, unexpected = lm.load_state_dict(text_state(), strict=False)
        missing = [k for k in missing if not (t.tie_word_embeddings and k == "lm_head.weight")]
        if missing or unexpected:
            raise ValueError(
                f"{t.weights} weights do not fit the text config: missing {missing[:3]}, unexpected {unexpected[:3]}"
            )
        if t.tie_word_embeddings:
            lm.tie_weights()
        model.reset_visual_norm()
        loaded.append("language_model")
    return loaded
