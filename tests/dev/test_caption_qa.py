"""dev/caption_qa.py: the caption-text twin of a packed example, and the script end to end on tiny."""

from __future__ import annotations

import json


def test_text_example_puts_the_caption_where_the_image_was(tiny_cfg, tiny_tokenizer, dev_script):
    cq = dev_script("caption_qa")
    from fmvr import tasks
    from train.data import tokenize_blocks

    scene = next(tasks.scenes("train", 1))
    ex = cq.example(tiny_tokenizer, tiny_cfg, scene, 0, "caption")
    qas = [(q, a) for _, q, a in tasks.training_questions(scene)]
    ids, target, blocks = tokenize_blocks(tiny_tokenizer, tiny_cfg, tiny_cfg.template, qas, 4096)
    words = tiny_tokenizer.encode(cq.caption_prefix(scene), add_special_tokens=False).ids
    at = ids.index(tiny_cfg.image_token_id)
    assert tiny_cfg.image_token_id not in ex.ids
    assert list(ex.ids[at : at + len(words)]) == words  # the caption, in the shared prefix
    assert set(ex.blocks[: at + len(words)]) == {0}
    assert list(ex.ids[at + len(words) :]) == ids[at + 1 :]  # the question blocks unchanged
    assert sum(ex.target) == sum(target)  # answers only are learned, none of the caption


def test_tiny_run_writes_json_and_markdown(tmp_path, dev_script):
    cq = dev_script("caption_qa")
    argv = ["--preset", "tiny", "--train-n", "8", "--test-n", "3", "--steps", "2", "--batch-size", "2"]
    assert cq.main([*argv, "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "caption_qa_tiny.json").read_text())
    phases = {(r["presentation"], r["phase"], r["category"]) for r in report["rows"]}
    assert phases == {
        (s, p, c) for s in cq.PRESENTATIONS for p in ("zero-shot", "lora") for c in cq.CANDIDATES
    }
    assert all(r["n"] == 3 and 0.0 <= r["accuracy"] <= 1.0 for r in report["rows"])
    md = (tmp_path / "caption_qa_tiny.md").read_text()
    assert "after 2 LoRA steps of 2" in md and "best constant answer" in md


def test_oracle_grid_sums_the_words_of_what_covers_each_cell(tiny_cfg, tiny_tokenizer, dev_script):
    cq = dev_script("caption_qa")
    import torch

    from fmvr import tasks

    scene = next(tasks.scenes("test", 1))
    table = torch.randn(tiny_cfg.text.vocab_size, 8)
    grid = cq.oracle_grid(table, tiny_tokenizer, scene)

    from train.ground import word_id

    def word(w):
        return table[word_id(tiny_tokenizer, w)]

    assert grid.shape == (cq.GRID * cq.GRID, 8)
    cell = tasks.SIZE / cq.GRID
    for o in scene.objects:  # the cell holding each object's centre carries its colour + shape
        cx, cy = (o.box[0] + o.box[2]) / 2, (o.box[1] + o.box[3]) / 2
        k = int(cy // cell) * cq.GRID + int(cx // cell)
        assert torch.allclose(grid[k], word(o.colour) + word(o.shape))
    corner_free = not any(
        tasks.covers(b, (cell / 2, cell / 2)) for b in [o.box for o in scene.objects] + [scene.digit_box]
    )
    if corner_free:
        assert torch.allclose(grid[0], word("empty"))
