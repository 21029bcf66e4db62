"""Exploratory harness (issue 8): which change lets `small` answer from the image within a CPU budget?

Not a benchmark of the shipped pipeline: one budget, cached frozen-tower features, the packed question
blocks of train.data, and accuracy by candidate scoring (the category's answer word ranked first by the
LM's next-token logit) on --ntest test scenes (50 -> one question per category each, +-7 points).
Results and the command of every run: dev/results/recipe_experiments_small.md (F to J).

    python dev/projector_recipes.py --cats colour --steps 50            # F: as the recipes
    ... --init identity --out-scale 1                                                       # G: every level at word scale
    ... --init identity --out-scale 1 --distill 1 --text-ce 1 --cats colour,count,region,exist,digit --bs 4
                                                                                            # H: distil from the caption
    ... --init identity --out-scale 1 --align-steps 150                                     # I: token-word alignment first
    ... --vocab-tau 0.1 --init identity --align-steps 150                                   # J: tokens = caption-word mixtures
    ... --init identity --out-scale 1 --align-steps 150 --no-bf16 --schedule constant [--proj-lr 2e-4]
                                                                                            # I in fp32 (rescaled)
    ... --init identity --out-scale 1 --oracle-warmup 30 --freeze-lm --cats colour,count,exist --no-bf16 \
        --schedule constant --steps 40                                                      # K: oracle-grid curriculum
    ... --text --tokens 48 / --text --oracle --tokens 36  (caption text / oracle word grid: see caption_qa.py)
    ... --init identity --ground-steps 400 --cats colour,count,exist --steps 30 --proj-lr 0 --no-bf16 \
        --schedule constant                                                                 # L: regress onto the grid first
    ... --ground-pos ...                                                                    # M: + position words and table

Knobs: --init identity sets every FMVR stage to plain 2x2 pooling (high_weight -1, b -0.5 in both branches);
--out-scale k rescales the projector's last layer so visual tokens start at k x the word-embedding RMS;
--distill w matches the question tokens' hidden states (per-dimension z-scored, layers --layers) to those
of the same LM reading the caption instead of the image; --text-ce w adds the caption-text answers' loss;
--align-steps N first trains the projector alone with a FILIP-style token-word contrastive loss against the
caption's word embeddings; --vocab-tau t makes every visual token a softmax mixture (temperature t) of the
embeddings of the words the training captions use; --ground-steps N first regresses every budget's tokens onto the
oracle grid of the same side (what became train/ground.py, the `ground` stage).
"""

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dev.caption_qa import oracle_grid  # noqa: E402
from fmvr import tasks  # noqa: E402
from fmvr.config import preset  # noqa: E402
from fmvr.model import build_model  # noqa: E402
from fmvr.template import render, user_turn  # noqa: E402
from fmvr.tokenizer import encode_segments, preset_tokenizer  # noqa: E402
from train.data import Example, collate, tokenize_blocks  # noqa: E402
from train.loss import lm_loss_sum  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--name", default="run", help="label of the run in the results file")
p.add_argument(
    "--cache", default="runs/recipe_probe", help="folder for cached tower features and results.jsonl"
)
p.add_argument("--tokens", type=int, default=36)
p.add_argument("--cats", default="colour")
p.add_argument("--steps", type=int, default=150)
p.add_argument("--bs", type=int, default=8)
p.add_argument("--ntrain", type=int, default=600)
p.add_argument("--ntest", type=int, default=50)
p.add_argument("--lm", default="lora")  # lora | full | frozen
p.add_argument("--lm-lr", type=float, default=5e-4)
p.add_argument("--proj-lr", type=float, default=2e-3)
p.add_argument("--lora-r", type=int, default=64)
p.add_argument("--lora-alpha", type=int, default=128)
p.add_argument("--init", default="released")  # released | identity
p.add_argument("--pyramid", default="fmvr")
p.add_argument(
    "--out-scale", type=float, default=0.0
)  # >0: rescale projector last layer so token rms = this x word rms
p.add_argument("--threads", type=int, default=2)
p.add_argument("--eval-every", type=int, default=50)
p.add_argument("--text", action="store_true")
p.add_argument("--oracle", action="store_true")
p.add_argument(
    "--oracle-warmup",
    type=int,
    default=0,
    help="first N LoRA steps on the oracle grid (LM learns the format)",
)
p.add_argument("--freeze-lm", action="store_true", help="after the oracle warm-up, train the projector only")
p.add_argument("--no-bf16", action="store_true", help="train in fp32 (default: bf16 autocast)")
p.add_argument("--schedule", default="cosine", choices=("cosine", "constant"))
p.add_argument("--oracle-layout", default="sum", choices=("sum", "checker"))
p.add_argument("--vocab-tau", type=float, default=0.0)
p.add_argument("--align-steps", type=int, default=0)
p.add_argument("--align-bs", type=int, default=32)
p.add_argument("--align-lr", type=float, default=2e-3)
p.add_argument("--align-tokens", default="36")
p.add_argument("--temp", type=float, default=0.05)
p.add_argument("--distill", type=float, default=0.0)
p.add_argument("--text-ce", type=float, default=0.0)
p.add_argument("--layers", default="4,8,12,16,20,24,28")
p.add_argument(
    "--ground-steps", type=int, default=0, help="first regress every budget's tokens onto the oracle grid"
)
p.add_argument(
    "--ground-pos", action="store_true", help="position words in the targets + a learned position table"
)
p.add_argument("--ground-lr", type=float, default=1e-3)
p.add_argument("--ground-bs", type=int, default=32)
p.add_argument("--ground-tokens", default="576,144,36,9,1")
args = p.parse_args()
torch.set_num_threads(args.threads)
cfg = preset("small", pyramid=args.pyramid)
T = args.tokens
model = build_model(cfg, seed=0)
tok = preset_tokenizer(cfg)
word_rms = float(model.language_model.get_input_embeddings().weight.detach().float().pow(2).mean().sqrt())

cache = Path(args.cache) / f"feats_{args.ntrain}_{args.ntest}.pt"
cache.parent.mkdir(parents=True, exist_ok=True)
if cache.exists():
    feats = torch.load(cache, weights_only=True)
else:
    from fmvr.preprocess import Preprocessor

    pre = Preprocessor.from_config(cfg)
    feats = {}
    t0 = time.time()
    for split, n in (("train", args.ntrain), ("test", args.ntest)):
        out = []
        sc = list(tasks.scenes(split, n))
        for i in range(0, n, 16):
            px = torch.from_numpy(pre([tasks.render_scene(s) for s in sc[i : i + 16]]))
            with torch.no_grad():
                out.append(model.vision_tower(px).to(torch.bfloat16))
        feats[split] = torch.cat(out)
    torch.save(feats, cache)
    print(f"tower features in {time.time() - t0:.0f}s", flush=True)

if args.init == "identity":
    with torch.no_grad():
        for st in model.pyramid.stages.values():
            for br in (st.gap, st.mp):
                br.high_weight.fill_(-1.0)
                br.b.fill_(-0.5)
if args.out_scale > 0 and not args.vocab_tau:
    with torch.no_grad():
        x = model.projector(feats["train"][:16].float())
        rms = float(x.pow(2).mean().sqrt())
        model.projector.mlp[2].weight.mul_(args.out_scale * word_rms / rms)
        model.projector.mlp[2].bias.mul_(args.out_scale * word_rms / rms)

if args.ground_pos:

    class PosProj(nn.Module):
        def __init__(self, inner, n, d):
            super().__init__()
            self.inner = inner
            self.pos = nn.Parameter(torch.zeros(n, d))

        def forward(self, x):
            return self.inner(x) + self.pos

    model.projector = PosProj(model.projector, 576, cfg.text.hidden_size if hasattr(cfg, "text") else 576)

if args.vocab_tau > 0:
    E_all = model.language_model.get_input_embeddings().weight.detach()
    vocab = sorted(
        {
            i
            for s_ in tasks.scenes("train", args.ntrain)
            for i in tok.encode(" " + tasks.caption(s_), add_special_tokens=False).ids
        }
    )
    print("vocab size", len(vocab), flush=True)

    class VocabProj(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            self.register_buffer("table", E_all[torch.tensor(vocab)].clone())

        def forward(self, x):
            z = self.inner(x)
            logits = F.normalize(z, dim=-1) @ F.normalize(self.table, dim=-1).t() / args.vocab_tau
            return logits.softmax(-1) @ self.table

    model.projector = VocabProj(model.projector)
for p_ in model.parameters():
    p_.requires_grad_(False)
for m in (model.projector, model.pyramid):
    for p_ in m.parameters():
        p_.requires_grad_(True)
if args.lm == "lora":
    from peft import LoraConfig, get_peft_model

    t = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model.language_model = get_peft_model(
        model.language_model, LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, target_modules=t)
    )
elif args.lm == "full":
    for p_ in model.language_model.parameters():
        p_.requires_grad_(True)
proj = [p_ for m in (model.projector, model.pyramid) for p_ in m.parameters() if p_.requires_grad]
lmp = [p_ for p_ in model.language_model.parameters() if p_.requires_grad]
groups = [{"params": proj, "lr": args.proj_lr}]
if lmp:
    groups.append({"params": lmp, "lr": args.lm_lr})
opt = torch.optim.AdamW(groups, weight_decay=0.0)
warm = max(1, args.steps // 20)


def lr_factor(s: int) -> float:
    if s < warm:
        return (s + 1) / warm
    if args.schedule == "constant":
        return 1.0
    return 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, args.steps - warm)))


sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
cats = set(args.cats.split(","))
train_scenes = list(tasks.scenes("train", args.ntrain))
test_scenes = list(tasks.scenes("test", args.ntest))


def example(i):
    qas = [(q, a) for c, q, a in tasks.training_questions(train_scenes[i]) if c in cats]
    if "caption" in cats:
        qas.insert(0, (tasks.DESCRIBE, tasks.caption(train_scenes[i])))
    ids, target, blocks = tokenize_blocks(tok, cfg, "chatml", qas, 4096)
    return Example(tuple(ids), tuple(target), (str(i),), i, tuple(blocks))


CANDS = {
    "colour": list(tasks.COLOURS),
    "count": list(tasks.NUMBERS[:5]),
    "region": list(tasks.SHAPES) + ["none"],
    "exist": ["yes", "no"],
    "digit": [str(d) for d in range(10)],
}


def first_id(word):
    return tok.encode(word, add_special_tokens=False).ids[0]


@torch.no_grad()
def evaluate():
    model.eval()
    res = {}
    for c in sorted(cats - {"caption"}):
        ok = n = 0
        cand = CANDS[c]
        cid = torch.tensor([first_id(w) for w in cand])
        for si, s in enumerate(test_scenes):
            for qc, q, a in s.questions:
                if qc != c:
                    continue
                segs = render("chatml", [user_turn(q)], add_generation_prompt=True)
                ids, _ = encode_segments(tok, segs, cfg.bos_id)
                ids = [x for i in ids for x in ([i] * T if i == cfg.image_token_id else [i])]
                idt = torch.tensor([ids])
                if args.text:
                    vis = cap_embed(test_scenes, [si])
                else:
                    grid = model.projector(feats["test"][si : si + 1].float())
                    vis = model.visual_tokens(grid, (T,))[T]
                emb = model.embed(idt, vis)
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    h = model.language_model.get_decoder()(inputs_embeds=emb).last_hidden_state[0, -1]
                logits = model.language_model.get_output_embeddings()(h.float())
                pred = cand[int(logits[cid].argmax())]
                ok += pred == a
                n += 1
        res[c] = ok / max(n, 1)
    model.train()
    return res


CAPL = 48


def oracle_embed(scenes_, idx):
    """Oracle visual tokens on a sqrt(--tokens)-sided grid from the scene record (caption_qa.oracle_grid,
    --oracle-layout sum or checker): [B, T, D]."""
    table = model.language_model.get_input_embeddings().weight
    side = int(round(T**0.5))
    return torch.stack([oracle_grid(table, tok, scenes_[i], side, args.oracle_layout) for i in idx])


def cap_embed(scenes_, idx):
    if args.oracle:
        return oracle_embed(scenes_, idx)
    E = model.language_model.get_input_embeddings().weight
    out = []
    for i in idx:
        ids = tok.encode(" " + tasks.caption(scenes_[i]), add_special_tokens=False).ids[:CAPL]
        ids = ids + [tok.encode(" ", add_special_tokens=False).ids[0]] * (CAPL - len(ids))
        out.append(E[torch.tensor(ids)])
    return torch.stack(out).detach()


def token_rms():
    if args.text:
        return 0.0
    with torch.no_grad():
        grid = model.projector(feats["test"][:4].float())
        return float(model.visual_tokens(grid, (T,))[T].pow(2).mean().sqrt())


LAYERS = [int(x) for x in args.layers.split(",")]


def run_lm(exs, vis, t):
    b = collate(exs, None, cfg, (t,))
    ids, mask, labels = b.per_budget[t]
    lm = model.language_model
    emb = model.embed(ids, vis)
    pos = mask.sum(-1)[:, 0] - 1
    out = lm.get_decoder()(
        inputs_embeds=emb, attention_mask=mask, position_ids=pos, output_hidden_states=True
    )
    hid = out.last_hidden_state
    sh = labels[:, 1:]
    keep = sh != -100
    logits = lm.get_output_embeddings()(hid[:, :-1][keep])
    ce = F.cross_entropy(logits.float(), sh[keep], reduction="sum") / b.num_targets()
    return ce, out.hidden_states, ids


def distill_step(exs, vis, cap):
    ce_i, hs_i, ids_i = run_lm(exs, vis, T)
    total = ce_i
    dl = torch.zeros(())
    if args.text_ce:
        ce_t, hs_t, ids_t = run_lm(exs, cap, CAPL)
        total = total + args.text_ce * ce_t
    else:
        with torch.no_grad():
            ce_t, hs_t, ids_t = run_lm(exs, cap, CAPL)
    if args.distill:
        # question/answer tokens: after the prefix, same order in both runs
        terms = []
        for layer in LAYERS:
            A, B = [], []
            for r, e in enumerate(exs):
                npre = e.blocks.count(0) - 1  # prefix ids minus the placeholder
                nblk = len(e.blocks) - e.blocks.count(0)
                pi, pt = npre + T, npre + CAPL
                A.append(hs_i[layer][r, pi : pi + nblk].float())
                B.append(hs_t[layer][r, pt : pt + nblk].float().detach())
            A, B = torch.cat(A), torch.cat(B)
            mu, sd = B.mean(0), B.std(0) + 1e-3
            terms.append(((A - mu) / sd - (B - mu) / sd).pow(2).mean())
        dl = torch.stack(terms).mean()
        total = total + args.distill * dl
    return total, dl


def caption_words(scenes_, idx):
    """[B, L] ids of the caption words (content words only kept later via mask)."""
    E = model.language_model.get_input_embeddings().weight
    rows = [tok.encode(" " + tasks.caption(scenes_[i]), add_special_tokens=False).ids for i in idx]
    L = max(map(len, rows))
    ids = torch.zeros(len(rows), L, dtype=torch.long)
    m = torch.zeros(len(rows), L, dtype=torch.bool)
    for r, row in enumerate(rows):
        ids[r, : len(row)] = torch.tensor(row)
        m[r, : len(row)] = True
    return E[ids].detach(), m


def align(steps):
    """Token-level contrastive alignment of visual tokens to the caption's word embeddings (FILIP-style)."""
    opt_a = torch.optim.AdamW(proj, lr=args.align_lr, weight_decay=0.0)
    rng_a = random.Random(1)
    budgets = [int(x) for x in args.align_tokens.split(",")]
    t0 = time.time()
    for st in range(steps):
        idx = rng_a.sample(range(args.ntrain), args.align_bs)
        t = rng_a.choice(budgets)
        grid = model.projector(feats["train"][idx].float())
        v = F.normalize(model.visual_tokens(grid, (t,))[t], dim=-1)  # [B, T, D]
        w, m = caption_words(train_scenes, idx)
        w = F.normalize(w, dim=-1)  # [B, L, D]
        sim = torch.einsum("itd,jld->ijtl", v, w)  # [B, B, T, L]
        w2v = sim.max(2).values  # [B, B, L]: each word's best token
        s_iw = (w2v * m[None]).sum(-1) / m.sum(-1)[None]  # [B, B] image i vs caption j
        v2w = sim.masked_fill(~m[None, :, None, :], -1).max(3).values.mean(-1)  # [B, B]
        lab = torch.arange(len(idx))
        loss = 0.0
        for S in (s_iw, v2w):
            S = S / args.temp
            loss = loss + F.cross_entropy(S, lab) + F.cross_entropy(S.t(), lab)
        opt_a.zero_grad()
        loss.backward()
        opt_a.step()
        if st % 20 == 0 or st == steps - 1:
            acc = float((s_iw.argmax(1) == lab).float().mean())
            print(f"align {st} loss {float(loss):.3f} acc {acc:.2f} {time.time() - t0:.0f}s", flush=True)


print(f"word rms {word_rms:.4f} token rms at {T}: {token_rms():.4f}", flush=True)
if args.align_steps:
    align(args.align_steps)
    if args.out_scale > 0 and not args.vocab_tau:  # back to the requested scale (the alignment is scale-free)
        with torch.no_grad():
            k = args.out_scale * word_rms / token_rms()
            model.projector.mlp[2].weight.mul_(k)
            model.projector.mlp[2].bias.mul_(k)
    print("after align, token rms", token_rms(), flush=True)


def ground(steps):
    """Regress the visual tokens of every budget in --ground-tokens onto the oracle word grid of the same side."""
    table = model.language_model.get_input_embeddings().weight.detach()
    budgets = [int(x) for x in args.ground_tokens.split(",")]
    tgt = {}
    t0 = time.time()
    for split, sc in (("train", train_scenes), ("test", test_scenes)):
        tgt[split] = {
            t: torch.stack(
                [oracle_grid(table, tok, s_, int(round(t**0.5)), position=args.ground_pos) for s_ in sc]
            )
            for t in budgets
        }
    print(f"ground targets in {time.time() - t0:.0f}s", flush=True)
    opt_g = torch.optim.AdamW(proj, lr=args.ground_lr, weight_decay=0.0)
    rng_g = random.Random(3)
    for st in range(steps):
        idx = rng_g.sample(range(args.ntrain), args.ground_bs)
        vis = model.visual_tokens(model.projector(feats["train"][idx].float()), tuple(budgets))
        loss = sum(F.mse_loss(vis[t], tgt["train"][t][idx]) for t in budgets) / (len(budgets) * word_rms**2)
        opt_g.zero_grad()
        loss.backward()
        opt_g.step()
        if st % 50 == 0 or st == steps - 1:
            with torch.no_grad():
                vt = model.visual_tokens(model.projector(feats["test"].float()), tuple(budgets))
                te = {t: round(float(F.mse_loss(vt[t], tgt["test"][t]) / word_rms**2), 3) for t in budgets}
            print(f"ground {st} loss {float(loss):.3f} test {te} {time.time() - t0:.0f}s", flush=True)


if args.ground_steps:
    ground(args.ground_steps)
    print("after grounding, token rms", token_rms(), flush=True)
if args.oracle_warmup:
    opt_w = torch.optim.AdamW(lmp, lr=args.lm_lr, weight_decay=0.0)
    rng_w = random.Random(2)
    for st in range(args.oracle_warmup):
        idx = [rng_w.randrange(args.ntrain) for _ in range(args.bs)]
        b = collate([example(i) for i in idx], None, cfg, (T,))
        ids, mask, labels = b.per_budget[T]
        args.oracle = True
        loss = lm_loss_sum(model, ids, mask, labels, oracle_embed(train_scenes, idx)) / b.num_targets()
        opt_w.zero_grad()
        loss.backward()
        opt_w.step()
        if st % 10 == 9:
            print(f"oracle warm-up {st + 1} loss {float(loss.detach()):.3f}", flush=True)
    args.text = True
    print("oracle grid after warm-up", evaluate(), flush=True)
    args.text = args.oracle = False
    if args.freeze_lm:
        for p_ in lmp:
            p_.requires_grad_(False)
print("step 0", evaluate(), flush=True)
rng = random.Random(0)
t0 = time.time()
log = []
model.train()
for step in range(args.steps):
    idx = [rng.randrange(args.ntrain) for _ in range(args.bs)]
    exs = [example(i) for i in idx]
    b = collate(exs, None, cfg, (T,))
    ids, mask, labels = b.per_budget[T]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=not args.no_bf16):
        if args.text:
            vis = cap_embed(train_scenes, idx)
        else:
            grid = model.projector(feats["train"][idx].float())
            vis = model.visual_tokens(grid, (T,))[T]
        if args.distill or args.text_ce:
            loss, dl = distill_step(exs, vis, cap_embed(train_scenes, idx))
        else:
            loss = lm_loss_sum(model, ids, mask, labels, vis) / b.num_targets()
    opt.zero_grad()
    loss.backward()
    gn = torch.nn.utils.clip_grad_norm_(proj + lmp, 1.0)
    opt.step()
    sched.step()
    log.append(float(loss.detach()))
    if args.distill and step % 10 == 9:
        print(f"  distill {float(dl):.4f}", flush=True)
    if (step + 1) % 10 == 0:
        print(
            f"step {step + 1} loss {sum(log[-10:]) / 10:.3f} gn {float(gn):.2f} {time.time() - t0:.0f}s",
            flush=True,
        )
    if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
        r = evaluate()
        print(f"eval step {step + 1}", r, f"token rms {token_rms():.3f}", flush=True)
with (Path(args.cache) / "results.jsonl").open("a") as f:
    f.write(json.dumps({"args": vars(args), "eval": r, "loss": log[-10:]}) + "\n")
