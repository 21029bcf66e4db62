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


@pytest.mark.parametrize("variant", tasks.VARIANTS)
def test_constant_baseline_is_fit_on_train_and_scored_on_the_split(variant):
    base = tasks.constant_baseline("val", 30, variant=variant, fit_n=60)
    fit = [(c, a) for s in tasks.scenes("train", 60, variant=variant) for c, _, a in s.questions]
    qs = [(c, a) for s in tasks.scenes("val", 30, variant=variant) for c, _, a in s.questions]
    for c in tasks.categories(variant):
        seen = [a for cat, a in fit if cat == c]
        answer, acc = base[c]
        assert all(seen.count(other) <= seen.count(answer) for other in set(seen))  # train's most common
        targets = [a for cat, a in qs if cat == c]
        assert acc == pytest.approx(targets.count(answer) / len(targets))  # scored on the val scenes
    assert base["all"][1] == pytest.approx(np.mean([base[c][1] for c in tasks.categories(variant)]))


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


# ---- the detail variant ----------------------------------------------------------------------


def test_detail_objects_are_small_many_and_apart():
    from fmvr.tasks import detail

    for scene in tasks.scenes("train", 40, variant="detail"):
        assert scene.variant == "detail" and scene.digit_box is None
        assert detail.OBJECTS[0] <= len(scene.objects) <= detail.OBJECTS[1]
        for o in scene.objects:
            x0, y0, x1, y1 = o.box
            assert detail.SIZES[0] <= x1 - x0 == y1 - y0 <= detail.SIZES[1]  # 12-28 px of 336 (14-32 at 384)
            assert x0 >= 0 and x1 <= tasks.SIZE and y0 >= 0 and y1 <= tasks.SIZE
        boxes = [o.box for o in scene.objects]
        assert not any(detail._overlap(a, b, 0) for i, a in enumerate(boxes) for b in boxes[i + 1 :])


def test_detail_answers_match_the_record_and_the_pixels():
    from fmvr.tasks import detail

    for scene in tasks.scenes("val", 10, variant="detail"):
        img = np.asarray(tasks.render_scene(scene)).astype(int)  # [H, W, 3]
        for o in scene.objects:  # every object is drawn in its colour at its centre (not a cross's arm gap)
            x0, y0, x1, y1 = o.box
            assert tuple(img[(y0 + y1) // 2, (x0 + x1) // 2]) == tasks.COLOURS[o.colour]
        cats = [c for c, _, _ in scene.questions]
        assert sorted(cats) == sorted(detail.CATEGORIES)
        for c, q, a in (*scene.questions, *tasks.training_questions(scene)):
            if c == "colour":
                shape = q.split("the ")[1].rstrip("?")
                assert [o.colour for o in scene.objects if o.shape == shape] == [
                    a
                ]  # one object of that shape
            elif c == "shape":
                colour = q.split("the ")[1].split(" object")[0]
                assert [o.shape for o in scene.objects if o.colour == colour] == [a]
            elif c == "count":
                colour = q.split("many ")[1].split(" ")[0]
                assert detail.COUNT_WORDS.index(a) == sum(o.colour == colour for o in scene.objects)
            elif c == "where":
                name = q.split("the ")[1].split("?")[0].replace(" object", "")
                (o,) = [o for o in scene.objects if name in (o.shape, o.colour)]
                cx, cy = (o.box[0] + o.box[2]) / 2, (o.box[1] + o.box[3]) / 2
                assert tasks.CELL_NAMES[(int(cy // tasks.CELL), int(cx // tasks.CELL))] == a


def test_detail_ground_targets_name_every_object_a_window_touches():
    scene = next(tasks.scenes("train", 1, variant="detail"))
    one = tasks.cell_words(scene, 1)[0]
    assert len(one) == 2 * len(scene.objects)  # the single window touches every object
    fine = tasks.cell_words(scene, 24)
    for o in scene.objects:  # at 576 tokens each object is named in every window its box meets
        x0, y0, x1, y1 = o.box
        meets = [
            r * 24 + c
            for r in range(24)
            for c in range(24)
            if c * 14 < x1 and x0 < c * 14 + 14 and r * 14 < y1 and y0 < r * 14 + 14
        ]
        assert meets and all(o.shape in fine[k] and o.colour in fine[k] for k in meets)
    assert ("empty",) in fine


def test_pooling_dilutes_the_detail_variant():
    """A probe-style check on pixels: name each object's colour from the mean colour of the
    pooled window holding its centre (nearest palette colour, after removing the window's grey).
    On detail scenes this loses accuracy from 576 to 9 tokens (measured: 1.0 -> 0.54; easy scenes
    0.86 -> 0.80, their textured backgrounds confuse the pixel probe at every budget)."""
    palette = np.array(list(tasks.COLOURS.values()), dtype=float)  # [6, 3]

    def probe(variant: str, side: int) -> float:
        right = []
        for scene in tasks.scenes("val", 12, variant=variant):
            img = np.asarray(tasks.render_scene(scene), dtype=float)  # [336, 336, 3]
            w = tasks.SIZE // side
            pooled = img.reshape(side, w, side, w, 3).mean(axis=(1, 3))  # [side, side, 3]
            grey = np.median(img.reshape(-1, 3), axis=0)  # the background
            for o in scene.objects:
                cx, cy = (o.box[0] + o.box[2]) // 2, (o.box[1] + o.box[3]) // 2
                cell = pooled[cy // w, cx // w] - grey
                share = max(1e-6, float(np.abs(cell).max() / np.abs(palette - grey).max()))
                guess = np.argmin(((palette - grey) * share - cell).__pow__(2).sum(1))
                right.append(list(tasks.COLOURS)[guess] == o.colour)
        return float(np.mean(right))

    detail_576, detail_9 = probe("detail", 24), probe("detail", 3)
    assert detail_576 > 0.9 and detail_576 - detail_9 > 0.2, (detail_576, detail_9)


def test_splits_never_share_a_scene_seed_in_either_variant():
    for variant in tasks.VARIANTS:
        seeds = {
            s: {sc.seed for sc in tasks.scenes(s, 50, variant=variant)} for s in ("train", "val", "test")
        }
        assert not seeds["test"] & (seeds["train"] | seeds["val"]) and not seeds["train"] & seeds["val"]
        other = {sc.seed for sc in tasks.scenes("test", 50, seed=1, variant=variant)}
        assert not other & seeds["test"]  # another benchmark seed: other test scenes


def test_paired_bootstrap_known_intervals():
    a = [1.0, 0.5, 0.8, 0.2] * 25
    assert tasks.paired_bootstrap(a, a) == (0.0, 0.0, 0.0)  # the same arm: no difference, no spread
    b = [x - 0.25 for x in a]
    d, lo, hi = tasks.paired_bootstrap(a, b)
    assert d == lo == hi == pytest.approx(0.25)  # a constant per-scene difference is known exactly
    coin = [1.0, 0.0] * 200  # a mean of 0.5 over 400 scenes: the interval is 0.5 +- 1.96 * 0.5 / 20
    m, lo, hi = tasks.paired_bootstrap(coin, n_boot=20_000, seed=1)
    assert (
        m == 0.5
        and lo == pytest.approx(0.5 - 0.049, abs=0.006)
        and hi == pytest.approx(0.5 + 0.049, abs=0.006)
    )
    with pytest.raises(ValueError, match="equal-length"):
        tasks.paired_bootstrap([], [])
