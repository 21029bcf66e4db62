"""LLaVA data: label masking, placeholder positions, truncation, bad images, collation."""

from __future__ import annotations

import json
import warnings

import pytest

from fmvr.tokenizer import IGNORE_INDEX
from train.data import DataError, LlavaDataset, collate, read_records, tokenize

CONV = [
    {"from": "human", "value": "<image>\nWhat colour is the circle?"},
    {"from": "gpt", "value": "The circle is red."},
    {"from": "human", "value": "How many squares are there?"},
    {"from": "gpt", "value": "two"},
]


def test_labels_only_on_assistant_turns(tiny_cfg, tiny_tokenizer):
    ids, target = tokenize(tiny_tokenizer, tiny_cfg, "vicuna_v1", CONV, 2048)
    assert ids[0] == tiny_cfg.bos_token_id and ids.count(tiny_cfg.image_token_id) == 1
    b = collate([_ex(ids, target)], None, tiny_cfg, (36, 9))
    for t in (36, 9):
        row_ids, mask, labels = (x[0] for x in b.per_budget[t])
        pos = (row_ids == tiny_cfg.image_token_id).nonzero().flatten().tolist()
        start = ids.index(tiny_cfg.image_token_id)
        assert pos == list(range(start, start + t))  # T contiguous placeholders where <image> was
        assert (labels[pos] == IGNORE_INDEX).all()
        kept = labels[labels != IGNORE_INDEX].tolist()
        assert tiny_tokenizer.decode(kept, skip_special_tokens=False) == " The circle is red.</s> two</s>"
        assert int(mask.sum()) == len(ids) - 1 + t


def test_plain_template_targets_the_caption(tiny_cfg, tiny_tokenizer):
    conv = [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "a red circle"}]
    ids, target = tokenize(tiny_tokenizer, tiny_cfg, "plain", conv, 2048)
    assert ids[1] == tiny_cfg.image_token_id
    kept = [i for i, t in zip(ids, target) if t]
    assert tiny_tokenizer.decode(kept) == "a red circle\n"


def test_truncation_never_cuts_the_image(tiny_cfg, tiny_tokenizer):
    full, _ = tokenize(tiny_tokenizer, tiny_cfg, "vicuna_v1", CONV, 2048)
    ids, target = tokenize(tiny_tokenizer, tiny_cfg, "vicuna_v1", CONV, 576 + len(full) - 4)
    assert len(ids) == len(full) - 3 and tiny_cfg.image_token_id in ids and any(target)
    assert (
        tokenize(tiny_tokenizer, tiny_cfg, "vicuna_v1", CONV, 575 + 42) is None
    )  # first answer starts at 42: all cut away
    with pytest.raises(DataError, match="cannot hold 1 image"):
        tokenize(tiny_tokenizer, tiny_cfg, "vicuna_v1", CONV, 300)


def _ex(ids, target):
    from train.data import Example

    return Example(tuple(ids), tuple(target), ("k",), 0)


def _dataset(tmp_path, tiny_cfg, tiny_tokenizer, strict):
    from fmvr.tasks import make_scene, render_scene

    render_scene(make_scene(0)).save(tmp_path / "good.png")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    recs = [{"id": n, "image": f"{n}.png", "conversations": CONV} for n in ("good", "corrupt", "missing")]
    recs.append({"id": "text-only", "conversations": CONV})
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in recs))
    records = read_records(tmp_path / "d.jsonl")
    return LlavaDataset(records, tmp_path, tiny_tokenizer, tiny_cfg, "vicuna_v1", strict=strict)


def test_bad_images_are_counted_and_skipped(tmp_path, tiny_cfg, tiny_tokenizer):
    ds = _dataset(tmp_path, tiny_cfg, tiny_tokenizer, strict=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = [(ds.example(i), ds.images(i) if ds.example(i) else None) for i in range(len(ds))]
    assert [p.shape for p in got[0][1]] == [(3, 336, 336)]
    assert got[1][1] is None and got[2][1] is None and got[3][0] is None
    assert ds.skipped["missing image"] == 1
    assert sum(v for k, v in ds.skipped.items() if k.startswith("corrupt image")) == 1
    assert any("no image" in k for k in ds.skipped)
    assert len(caught) >= 3


def test_bad_images_fatal_when_strict(tmp_path, tiny_cfg, tiny_tokenizer):
    ds = _dataset(tmp_path, tiny_cfg, tiny_tokenizer, strict=True)
    assert ds.images(0) is not None
    with pytest.raises(DataError, match="corrupt image"):
        ds.images(1)
    with pytest.raises(DataError, match="missing image"):
        ds.images(2)


def test_collate_pads_right_with_masks(tiny_cfg, tiny_tokenizer):
    a = tokenize(tiny_tokenizer, tiny_cfg, "vicuna_v1", CONV, 2048)
    b = tokenize(tiny_tokenizer, tiny_cfg, "vicuna_v1", CONV[:2], 2048)
    batch = collate([_ex(*a), _ex(*b)], None, tiny_cfg, (1,))
    ids, mask, labels = batch.per_budget[1]
    assert ids.shape == (2, len(a[0])) and mask[0].all()
    short = len(b[0])
    assert not mask[1, short:].any() and (ids[1, short:] == tiny_cfg.pad_token_id).all()
    assert (labels[1, short:] == IGNORE_INDEX).all()


def test_bad_data_file(tmp_path):
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        read_records(tmp_path / "x.json")
    with pytest.raises(DataError, match="not found"):
        read_records(tmp_path / "nope.json")


def test_mix_kind_adds_one_caption_block_per_scene(tiny_cfg, tiny_tokenizer):
    """kind "mix": the qa blocks plus a "Describe the image." block answered by the caption,
    first (never cut by max_length), each block its own independent question."""
    from fmvr import tasks
    from train.data import BenchDataset

    qa = BenchDataset("train", 2, tiny_tokenizer, tiny_cfg, tiny_cfg.template, kind="qa")
    mix = BenchDataset("train", 2, tiny_tokenizer, tiny_cfg, tiny_cfg.template, kind="mix")
    a, b = qa.example(0), mix.example(0)
    assert max(b.blocks) == max(a.blocks) + 1
    first = [i for i, k in zip(b.ids, b.blocks) if k == 1]
    text = tiny_tokenizer.decode(first)
    assert tasks.DESCRIBE.lower().rstrip(".") in text.lower()
    assert tasks.caption(mix.scenes[0]).lower().rstrip(".") in text.lower()
    with pytest.raises(ValueError, match="independent"):
        BenchDataset("train", 1, tiny_tokenizer, tiny_cfg, tiny_cfg.template, kind="mix", independent=False)


def test_bench_kind_and_template_flags_are_checked():
    from train.stages import TrainConfig

    assert TrainConfig(stage="stage1").data_kind == "caption"
    assert TrainConfig(stage="stage1", bench_kind="mix").data_kind == "mix"
    assert TrainConfig(stage="stage1").template_for("chatml") == "plain"
    assert TrainConfig(stage="stage1", template="chat").template_for("chatml") == "chatml"
    with pytest.raises(ValueError, match="bench kind"):
        TrainConfig(bench_kind="pictures").check()
    with pytest.raises(ValueError, match="template"):
        TrainConfig(template="vicuna").check()
    with pytest.raises(ValueError, match="independent"):
        TrainConfig(bench_kind="mix", bench_qa="conversation").check()


def test_bench_clips_carry_two_frames_in_the_shared_prefix(tiny_cfg, tiny_tokenizer):
    from train.data import BenchDataset

    ds = BenchDataset("val", 2, tiny_tokenizer, tiny_cfg, "vicuna_v1", kind="mix", clips=3)
    assert len(ds) == 5
    ex, scene_ex = ds.example(3), ds.example(0)
    img = tiny_cfg.image_token_id
    prefix = [i for i, b in zip(ex.ids, ex.blocks) if b == 0]
    assert prefix.count(img) == 2 and ex.ids.count(img) == 2 and prefix[-1] == img
    assert len(ex.image_keys) == 2 and len(set(ex.image_keys)) == 2
    frames = ds.images(3)
    assert len(frames) == 2 and (frames[0] != frames[1]).any()
    batch = collate([scene_ex, ex], [p for i in (0, 3) for p in ds.images(i)], tiny_cfg, (9,))
    assert batch.keys == [*scene_ex.image_keys, *ex.image_keys]
    ids = batch.per_budget[9][0]
    assert (ids[0] == img).sum() == 9 and (ids[1] == img).sum() == 18
    with pytest.raises(ValueError, match="qa or mix"):
        BenchDataset("val", 2, tiny_tokenizer, tiny_cfg, "plain", kind="caption", clips=1)


def test_llava_records_with_several_images(tmp_path, tiny_cfg, tiny_tokenizer):
    from fmvr.tasks import make_scene, render_scene

    for n in (0, 1):
        render_scene(make_scene(n)).save(tmp_path / f"{n}.png")
    two = [{"from": "human", "value": "<image>\n<image>\nWhat changed?"}, {"from": "gpt", "value": "nothing"}]
    recs = [
        {"id": "two", "image": ["0.png", "1.png"], "conversations": two},
        {"id": "short", "image": ["0.png", "1.png"], "conversations": CONV},  # one placeholder, two images
    ]
    ds = LlavaDataset(recs, tmp_path, tiny_tokenizer, tiny_cfg, "vicuna_v1")
    ex = ds.example(0)
    assert ex.ids.count(tiny_cfg.image_token_id) == 2 and len(ex.image_keys) == 2
    assert len(ds.images(0)) == 2
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        assert ds.example(1) is None
    assert any("with 2 image(s) needs 2" in k for k in ds.skipped)


def test_bench_questions_keeps_n_blocks_one_of_each_category_first(tiny_cfg, tiny_tokenizer):
    from fmvr import tasks
    from fmvr.tasks.detail import CATEGORIES
    from train.data import BenchDataset, question_subset

    qs = tasks.training_questions(tasks.make_scene(3, "detail"))
    five = question_subset(qs, 5)
    assert sorted(c for c, _, _ in five) == sorted(CATEGORIES)  # every category once, not 5 counts
    assert question_subset(qs, 7)[:5] == five and len(question_subset(qs, 7)) == 7
    assert question_subset(qs, 0) == qs == question_subset(qs, 99)
    full = BenchDataset("train", 1, tiny_tokenizer, tiny_cfg, tiny_cfg.template, variant="detail")
    cut = BenchDataset("train", 1, tiny_tokenizer, tiny_cfg, tiny_cfg.template, variant="detail", questions=5)
    assert max(full.example(0).blocks) == len(qs) and max(cut.example(0).blocks) == 5
    assert len(cut.example(0).ids) < len(full.example(0).ids) / 2
