"""TextStream: UTF-8 split across byte-level tokens, and stop strings split across tokens."""

from __future__ import annotations

from runtime.llm import TextStream


class FakeGen:
    def __init__(self, ids):
        self.ids, self.finish_reason = ids, None

    def __iter__(self):
        yield from self.ids
        self.finish_reason = "length"


def test_multibyte_characters_are_never_emitted_half(tiny_tokenizer):
    text = "café ünïcode 日本 ok"
    ids = tiny_tokenizer.encode(text, add_special_tokens=False).ids
    assert len(ids) > len(text) // 2  # byte-level pieces
    stream = TextStream(FakeGen(ids), tiny_tokenizer)
    deltas = list(stream)
    assert "".join(deltas) == text == stream.full
    assert not any("\ufffd" in d for d in deltas)


def test_stop_string_across_tokens_is_cut_and_never_streamed(tiny_tokenizer):
    text = "red circle STOP blue square"
    ids = tiny_tokenizer.encode(text, add_special_tokens=False).ids
    gen = FakeGen(ids)
    stream = TextStream(gen, tiny_tokenizer, stop=["STOP"])
    deltas = list(stream)
    assert "".join(deltas) == "red circle " == stream.full
    assert not any("S" in d for d in deltas)
    assert gen.finish_reason == "stop"


def test_no_stop_string_streams_everything(tiny_tokenizer):
    ids = tiny_tokenizer.encode("one two three", add_special_tokens=False).ids
    stream = TextStream(FakeGen(ids), tiny_tokenizer, stop=["four"])
    assert "".join(stream) == "one two three"
