"""Evaluation: batched left-padded greedy decoding equals the model's own generate; files and CLI."""

from __future__ import annotations

import json

import pytest
import torch

from fmvr import tasks
from fmvr.checkpoint import save_checkpoint
from fmvr.model import build_model
from fmvr.tokenizer import prompt_ids
from train.eval import evaluate_bench, generate_batch, main


def _peaky(cfg, seed=3):
    """A random tiny model with a sharp LM head so that greedy answers vary with the input."""
    model = build_model(cfg, seed=seed)
    with torch.no_grad():
        model.language_model.lm_head.weight.mul_(50)
    return model


def test_batched_generation_equals_generate(tiny_cfg, tiny_tokenizer):
    from fmvr.preprocess import Preprocessor

    model = _peaky(tiny_cfg)
    scene = tasks.make_scene(7)
    pix = torch.from_numpy(Preprocessor.from_config(tiny_cfg)(tasks.render_scene(scene)))  # [1, 3, S, S]
    questions = [
        "What colour is the circle?",
        "How many red objects are there in this picture today?",
        "Is it?",
    ]
    prompts = [prompt_ids(tiny_tokenizer, tiny_cfg.template, q, 1, tiny_cfg.bos_id) for q in questions]
    for t in (36, 1):
        feats = model.encode_image(pix, t).expand(len(prompts), -1, -1)  # [3, T, D]
        batched = generate_batch(model, prompts, feats, t, max_new_tokens=5)
        for p, got in zip(prompts, batched):
            from fmvr.tokenizer import expand_image_tokens

            ids = torch.tensor([expand_image_tokens(p, tiny_cfg.image_token_id, t)])
            assert got == model.generate(pix, ids, t, max_new_tokens=5)[0]
        assert len({tuple(b) for b in batched}) > 1  # the rows really differ


def test_shared_prefix_generation_equals_full_prompts(tiny_cfg, tiny_tokenizer):
    """evaluate_bench prefills each image once and repeats its KV cache per question."""
    from fmvr.preprocess import Preprocessor
    from train.eval import generate_shared, split_at_image

    model = _peaky(tiny_cfg)
    scenes = [tasks.make_scene(7), tasks.make_scene(8)]
    pix = torch.from_numpy(Preprocessor.from_config(tiny_cfg)([tasks.render_scene(s) for s in scenes]))
    questions = [
        "What colour is the circle?",
        "How many red objects are there in this picture today?",
        "Is it?",
    ]
    prompts = [
        prompt_ids(tiny_tokenizer, tiny_cfg.template, q, 1, tiny_cfg.bos_id) for q in questions
    ] * 2  # image-major
    parts = [split_at_image(p, tiny_cfg.image_token_id) for p in prompts]
    for t in (144, 9):
        feats = model.encode_image(pix, t)  # [2, T, D]
        shared = generate_shared(model, parts[0][0], feats, [r for _, r in parts], 3, t, max_new_tokens=5)
        full = generate_batch(model, prompts, feats.repeat_interleave(3, dim=0), t, max_new_tokens=5)
        assert shared == full
        assert len({tuple(a) for a in shared}) > 1


def test_evaluate_bench_structure(tiny_cfg, tiny_tokenizer):
    res = evaluate_bench(_peaky(tiny_cfg), tiny_tokenizer, (36, 1), n=2, split="val")
    assert set(res["accuracy"]) == {36, 1}
    assert set(res["accuracy"][36]) == {*tasks.CATEGORIES, "all"}
    assert len(res["samples"]) == 2 * 5 * 2


def test_cli_bench_and_answers_file(tmp_path, tiny_cfg, tiny_tokenizer, capsys):
    ckpt = tmp_path / "ckpt"
    save_checkpoint(build_model(tiny_cfg, seed=0), ckpt, tokenizer=tiny_tokenizer)
    out = tmp_path / "acc.json"
    assert main(["--checkpoint", str(ckpt), "--bench-n", "1", "--tokens", "9", "--out", str(out)]) == 0
    assert "| 9 |" in capsys.readouterr().out
    assert (
        main(["--checkpoint", str(ckpt), "--bench-n", "1", "--tokens", "9", "--out", str(out), "--reuse"])
        == 0
    )
    assert "saved result" in capsys.readouterr().out
    qfile = tasks.write_llava(tmp_path / "data", "test", 1, kind="questions")
    answers = tmp_path / "answers.jsonl"
    args = [
        "--checkpoint",
        str(ckpt),
        "--questions",
        str(qfile),
        "--image-folder",
        str(tmp_path / "data"),
        "--answers-file",
        str(answers),
        "--tokens",
        "36",
    ]
    assert main(args) == 0
    rows = [json.loads(line) for line in answers.read_text().splitlines()]
    assert len(rows) == 5 and {"question_id", "prompt", "text", "answer_id", "model_id"} <= set(rows[0])


def test_old_flag_spellings_are_refused(capsys):
    for old in (["--checkpoint", "c", "--ckpt", "c"], ["--checkpoint", "c", "--budgets", "1"]):
        with pytest.raises(SystemExit) as e:
            main(old)
        assert e.value.code == 2 and old[-2] in capsys.readouterr().err


def test_bad_tokens_and_several_budgets_for_questions_are_clear_errors(
    tmp_path, tiny_cfg, tiny_tokenizer, capsys
):
    ckpt = tmp_path / "ckpt"
    save_checkpoint(build_model(tiny_cfg, seed=0), ckpt, tokenizer=tiny_tokenizer)
    assert main(["--checkpoint", str(ckpt), "--tokens", "37"]) == 2
    assert "[37] are not budgets of this model (valid: 576, 144, 36, 9, 1)" in capsys.readouterr().err
    assert main(["--checkpoint", str(ckpt), "--tokens", "36,9", "--questions", "q.jsonl"]) == 2
    assert "pass one --tokens value" in capsys.readouterr().err


def test_frames_category_asks_about_both_frames(tiny_cfg, tiny_tokenizer):
    """Clips are scored with both frames in one prompt: the same answers as generate_batch on
    the clip's own two images, and a different second frame can change them."""
    from fmvr.preprocess import Preprocessor

    model = _peaky(tiny_cfg)
    res = evaluate_bench(model, tiny_tokenizer, (9,), n=1, split="val", clips=3)
    assert set(res["accuracy"][9]) == {*tasks.CATEGORIES, "all", tasks.CLIP_CATEGORY}
    frames = [s for s in res["samples"] if s["category"] == tasks.CLIP_CATEGORY]
    assert len(frames) == 3 and res["n_questions"] == 5 + 3
    clip = next(tasks.clips("val", 1))
    pre = Preprocessor.from_config(tiny_cfg)
    prompt = prompt_ids(tiny_tokenizer, tiny_cfg.template, tasks.APPEARED, 2, tiny_cfg.bos_id)
    assert prompt.count(tiny_cfg.image_token_id) == 2
    feats = model.encode_image(torch.from_numpy(pre([tasks.render_scene(f) for f in clip.frames])), 9)
    got = tiny_tokenizer.decode(generate_batch(model, [prompt], feats, 9, images=2)[0]).strip()
    assert got == frames[0]["output"]
