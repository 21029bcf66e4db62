"""The built-in benchmark: deterministic, splits apart, answers re-derived from the record and pixels."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fmvr import tasks
from fmvr.tasks.scene import digit_scans


def test_deterministic_for_a_seed():
    a, b = tasks.make_scene(123), tasks.make_scene(123)
    assert a == b
    assert np.array_equal(np.asarray(tasks.render_scene(a)), np.asarray(tasks.render_scene(b)))
    assert tasks.make_scene(124) != a


def test_splits_do_not_share_scenes():
    seeds = {s: {sc.seed for sc in tasks.scenes(s, 30)} for s in ("train", "val", "test")}
    assert (
        not seeds["train"] & seeds["val"]
        and not seeds["train"] & seeds["test"]
        and not seeds["val"] & seeds["test"]
    )


def _cell_of(box):
    x0, y0, x1, y1 = box
    return ((y0 + y1) // 2 // tasks.CELL, (x0 + x1) // 2 // tasks.CELL)


@pytest.mark.parametrize("seed", range(25))
def test_answers_match_the_record_and_the_pixels(seed):
    scene = tasks.make_scene(seed)
    img = np.asarray(tasks.render_scene(scene)).astype(int)  # [H, W, 3]
    assert img.shape == (336, 336, 3)
    for o in scene.objects:
        assert _cell_of(o.box) == o.cell  # the record's cell is where the object was drawn
        if o.shape != "ring":  # a ring has a hole at its centre
            x0, y0, x1, y1 = o.box
            assert tuple(img[(y0 + y1) // 2, (x0 + x1) // 2]) == tasks.COLOURS[o.colour]
    x0, y0, x1, y1 = scene.digit_box
    card = img[y0:y1, x0:x1, 0]
    assert card.min() < 128 and card.max() == 255  # ink on a white card
    cats = {c: (q, a) for c, q, a in scene.questions}
    assert sorted(cats) == sorted(tasks.CATEGORIES)
    for c, q, a in (*scene.questions, *tasks.training_questions(scene)):
        assert a == _rederive(scene, c, q), (c, q, a)


def _rederive(scene, cat, q):
    """The answer read back from the record's boxes, independently of tasks.answer."""
    if cat == "colour":
        shape = q.split("the ")[1].rstrip("?")
        return [o.colour for o in scene.objects if o.shape == shape][0]
    if cat == "count":
        colour = q.split("many ")[1].split(" ")[0]
        return tasks.NUMBERS[len([o for o in scene.objects if o.colour == colour])]
    if cat == "region":
        name = next(n for n in tasks.REGIONS if f"the {n}" in q)
        here = [o.shape for o in scene.objects if _cell_of(o.box) == tasks.REGIONS[name]]
        return here[0] if here else "none"
    if cat == "exist":
        colour, shape = q.split("a ")[1].split(" in")[0].split(" ")
        return "yes" if any((o.colour, o.shape) == (colour, shape) for o in scene.objects) else "no"
    assert cat == "digit"
    return str(digit_scans()[1][scene.digit_index])


def test_answer_balance_over_many_scenes():
    answers = [a for s in tasks.scenes("train", 200) for c, _, a in s.questions if c == "exist"]
    assert 0.35 < answers.count("yes") / len(answers) < 0.65  # POPE-like: about half absent


def test_write_llava_format(tmp_path):
    path = tasks.write_llava(tmp_path, "val", 3, kind="questions")
    records = json.loads(path.read_text())
    assert len(records) == 15
    for r in records:
        assert (tmp_path / r["image"]).is_file()
        assert r["conversations"][0]["value"].startswith("<image>\n")
        assert r["conversations"][1]["value"] == r["answer"]
    qa = json.loads(tasks.write_llava(tmp_path, "val", 3, kind="qa").read_text())
    first = next(tasks.scenes("val", 1))
    assert len(qa) == 3 and len(qa[0]["conversations"]) == 2 * len(tasks.training_questions(first)) >= 30


def test_score():
    assert tasks.score(" Red.", "red") and not tasks.score("red circle", "red")


def test_constant_baseline_is_the_best_single_answer():
    base = tasks.constant_baseline("val", 30)
    qs = [(c, a) for s in tasks.scenes("val", 30) for c, _, a in s.questions]
    for c in tasks.CATEGORIES:
        targets = [a for cat, a in qs if cat == c]
        answer, acc = base[c]
        assert acc == targets.count(answer) / len(targets)
        assert all(targets.count(other) <= targets.count(answer) for other in set(targets))
    assert base["all"][1] == pytest.approx(np.mean([base[c][1] for c in tasks.CATEGORIES]))


@pytest.mark.parametrize("i", range(4))
def test_clip_second_frame_adds_one_new_object_only(i):
    clip = list(tasks.clips("val", 4))[i]
    first, second = (np.asarray(tasks.render_scene(f)).astype(int) for f in clip.frames)
    x0, y0, x1, y1 = clip.added.box
    changed = (first != second).any(-1)  # [H, W]
    assert changed.any() and not changed[:y0].any() and not changed[y1 + 1 :].any()
    assert not changed[:, :x0].any() and not changed[:, x1 + 1 :].any()  # inside the new box (inclusive)
    assert clip.added.shape not in {o.shape for o in clip.first.objects}
    assert clip.added.cell not in {o.cell for o in clip.first.objects} | {clip.first.digit_cell}
    assert clip.questions == ((tasks.CLIP_CATEGORY, tasks.APPEARED, clip.added.shape),)
    asked = dict((q, a) for _, q, a in tasks.clip_training_questions(clip))
    assert asked[f"Which frames show the {clip.added.shape}?"] == "the second"
    assert all(asked[f"Which frames show the {o.shape}?"] == "both" for o in clip.first.objects)


def test_clips_use_scenes_no_split_index_uses():
    plain = {s.seed for split in tasks.SPLIT_SEEDS for s in tasks.scenes(split, 50)}
    clip_seeds = {c.seed for split in tasks.SPLIT_SEEDS for c in tasks.clips(split, 50)}
    assert len(clip_seeds) == 150 and not plain & clip_seeds
