"""Several images per request: placeholders, per-image budgets (forced and chosen), the policy's
split of one deadline, the batched vision pass, the server, the CLI, video, the context check."""

from __future__ import annotations

import base64
import io
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from fmvr.template import prompt_turns, user_turn
from fmvr.tokenizer import expand_image_tokens
from runtime.images import ContextError, encode_images
from runtime.llm import SamplingParams
from runtime.options import OptionsError
from runtime.policy import DeadlineError, Policy, ladder

PROMPT = "What changed between the pictures?"
BUDGETS = (576, 144, 36, 9, 1)


@pytest.fixture(scope="module")
def frames() -> list[np.ndarray]:
    """Three distinct camera frames of one size, uint8 RGB [120, 160, 3]."""
    rng = np.random.default_rng(1)
    return [rng.integers(0, 256, (120, 160, 3), dtype=np.uint8) for _ in range(3)]


# ---- the prompt ---------------------------------------------------------------------------------


def test_one_placeholder_per_image_in_front_of_the_question():
    assert user_turn("Which is newer?", 3)["value"] == "<image>\n<image>\n<image>\nWhich is newer?"
    assert user_turn("<image>\nWhich?", 2)["value"] == "<image>\n<image>\nWhich?"  # re-laid out
    turns = [{"from": "human", "value": "left <image> right <image> which?"}]
    assert prompt_turns(turns, 2) == turns  # placeholders already one per image: kept where they are
    with pytest.raises(ValueError, match="holds 2 <image> placeholder.*3 image"):
        prompt_turns(turns, 3)
    system = [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Which?"}]
    assert prompt_turns(system, 2)[1]["value"] == "<image>\n<image>\nWhich?"  # the first HUMAN turn


def test_the_prompt_expands_each_placeholder_to_its_images_budget_in_order(pipe):
    img = pipe.special["image"]
    ids = pipe.prompt_ids(PROMPT, 3)
    assert ids.count(img) == 3
    expanded = expand_image_tokens(ids, img, [1, 9, 36])
    runs, n = [], 0
    for i in [*expanded, -1]:  # lengths of the runs of placeholders, in order
        if i == img:
            n += 1
        elif n:
            runs, n = [*runs, n], 0
    assert runs == [1, 9, 36] and len(expanded) == len(ids) - 3 + 46
    with pytest.raises(ValueError, match="3 image placeholders.*2 image"):
        expand_image_tokens(ids, img, [9, 36])


def test_each_images_tokens_sit_at_its_own_placeholder(pipe):
    d = pipe.decoder.embed(np.array([0])).shape[-1]
    feats = [np.full((t, d), k + 1.0, np.float32) for k, t in enumerate((9, 1, 36))]  # image k: k + 1
    ids = pipe.prompt_ids(PROMPT, 3)
    x = pipe.embeddings(ids, feats)  # [1, S, D]
    expanded = np.asarray(expand_image_tokens(ids, pipe.special["image"], [9, 1, 36]))
    where = np.flatnonzero(expanded == pipe.special["image"])
    assert x.shape[1] == len(expanded)
    assert [float(v) for v in x[0, where, 0]] == [1.0] * 9 + [2.0] + [3.0] * 36


# ---- budgets per image ----------------------------------------------------------------------------


def test_forced_budgets_per_image_are_honoured_and_reported(pipe, frames):
    r = pipe.ask(frames, PROMPT, tokens=[1, 9, 36], max_new_tokens=6)
    assert r.budgets == [1, 9, 36] and r.budget == 36  # `budget` is the newest (last) image's
    text = len(pipe.prompt_ids(PROMPT, 3)) - 3
    assert r.prompt_tokens == text + 46
    # the same answer as decoding from each frame encoded alone at its budget
    feats = [pipe.encode(f, [t]).features[t] for f, t in zip(frames, (1, 9, 36))]
    params = SamplingParams(max_new_tokens=6, stop_token_ids=(pipe.special["eos"],))
    assert list(pipe.decoder.start(pipe.embeddings(pipe.prompt_ids(PROMPT, 3), feats), params)) == r.token_ids
    every = pipe.ask(frames, PROMPT, tokens=9, max_new_tokens=2)
    assert every.budgets == [9, 9, 9]  # one int applies to every image


def test_a_single_image_still_works_and_reports_one_budget(pipe, frames):
    r = pipe.ask(frames[0], PROMPT, tokens=9, max_new_tokens=2)
    assert (r.budget, r.budgets) == (9, [9])
    assert r.token_ids == pipe.ask([frames[0]], PROMPT, tokens=9, max_new_tokens=2).token_ids


def test_bad_per_image_budgets_are_clear_errors(pipe, frames):
    with pytest.raises(OptionsError, match=r"tokens lists 2 budgets \[9, 36\] for 3 image"):
        pipe.ask(frames, PROMPT, tokens=[9, 36])
    with pytest.raises(ValueError, match="7 visual tokens is not a budget"):
        pipe.ask(frames, PROMPT, tokens=[9, 7, 36])
    with pytest.raises(ValueError, match="1 to 32 images, got 0"):
        pipe.ask([], PROMPT)


# ---- the policy -----------------------------------------------------------------------------------


def test_the_ladder_is_newest_largest_others_equal_or_one_level_smaller():
    assert ladder(BUDGETS, 1) == [(576,), (144,), (36,), (9,), (1,)]
    assert ladder((144, 36, 9), 3) == [
        (144, 144, 144),
        (36, 36, 144),
        (36, 36, 36),
        (9, 9, 36),
        (9, 9, 9),
    ]


def test_the_ladder_costs_less_at_every_step(synthetic_profile):
    policy = Policy(synthetic_profile, BUDGETS)
    times = [policy.predict(c, 40, 16).ttft_ms for c in ladder(BUDGETS, 4)]
    assert times == sorted(times, reverse=True) and len(set(times)) == len(times)


def test_the_newest_frame_gets_the_largest_budget_that_fits(synthetic_profile):
    """4 frames, 100 ms: all at 144 is predicted at 146.6 ms (misses); a single budget for all
    would have to drop every frame to 36; the ladder keeps 144 for the newest at 84.2 ms."""
    policy = Policy(synthetic_profile, BUDGETS)
    c = policy.choose(100, 40, 16, images=4)
    assert c.budgets == (36, 36, 36, 144) and c.budget == 144 and c.deadline_met is True
    assert c.prediction.ttft_ms == pytest.approx(84.2)  # fits 100
    assert policy.predict((144,) * 4, 40, 16).ttft_ms == pytest.approx(146.6)  # misses 100
    uniform = max(t for t in BUDGETS if policy.predict((t,) * 4, 40, 16).ttft_ms <= 100)
    assert uniform == 36 < c.budget
    assert c.candidates["36,36,36,144"] == pytest.approx(84.2) and "newest 144, others 36" in c.reason


def test_when_nothing_fits_all_smallest_missed_or_refused_with_strict(synthetic_profile):
    policy = Policy(synthetic_profile, BUDGETS)
    c = policy.choose(20, 40, 16, images=4)  # all at 1 token: 37.4 ms
    assert c.budgets == (1, 1, 1, 1) and c.deadline_met is False and "no budget fits 20 ms" in c.reason
    with pytest.raises(DeadlineError, match=r"no budget fits 20 ms.*\(1,1,1,1\) is predicted at 37.4"):
        policy.choose(20, 40, 16, strict=True, images=4)


def test_the_pipeline_reports_the_policys_per_image_budgets(pipe, frames, synthetic_profile):
    # Seconds, not ms: the real preprocessing time (counted as spent) cannot move the choice.
    synthetic_profile.vision_ms = {
        t: {k: v * 1000 for k, v in d.items()} for t, d in synthetic_profile.vision_ms.items()
    }
    pipe.use_profile(synthetic_profile)
    try:
        text = len(pipe.prompt_ids(PROMPT, 3)) - 3
        fits = pipe.policy.predict((36, 36, 144), text, 4, spent_ms=0.0).ttft_ms
        misses = pipe.policy.predict((144, 144, 144), text, 4, spent_ms=0.0).ttft_ms
        r = pipe.ask(frames, PROMPT, latency_ms=(fits + misses) / 2, max_new_tokens=4)
        assert r.budgets == [36, 36, 144] and r.predicted_deadline_met is True
        assert set(r.candidates_ms) == {",".join(map(str, c)) for c in ladder(pipe.budgets, 3)}
        with pytest.raises(DeadlineError):
            pipe.ask(frames, PROMPT, latency_ms=1, strict=True)
        missed = pipe.ask(frames, PROMPT, latency_ms=1, max_new_tokens=1)
        assert missed.budgets == [1, 1, 1] and missed.predicted_deadline_met is False
    finally:
        pipe.reload_profile()


# ---- the vision pass ----------------------------------------------------------------------------


def test_one_batched_pass_gives_the_features_of_n_single_passes(pipe, frames):
    xs = [pipe.prepare(f) for f in frames]  # [1, H, W, 3] each
    feats, calls = encode_images(pipe.vision, xs, [36, 36, 36])
    assert calls == 1
    for x, f in zip(xs, feats):
        np.testing.assert_allclose(f, pipe.vision.encode(x, [36])[36][0], rtol=1e-5, atol=1e-5)
    mixed, calls = encode_images(pipe.vision, xs, [9, 36, 144])  # a shared graph: still one pass
    assert calls == 1 and [f.shape[0] for f in mixed] == [9, 36, 144]


def test_frames_of_other_sizes_take_a_call_each(pipe, frames):
    small = np.ascontiguousarray(frames[0][:60, :80])
    xs = [pipe.prepare(f) for f in (frames[0], small, frames[1])]
    feats, calls = encode_images(pipe.vision, xs, [9, 9, 9])
    assert calls == (2 if pipe.manifest.vision.frame_input else 1)
    np.testing.assert_allclose(feats[1], pipe.vision.encode(xs[1], [9])[9][0], rtol=1e-5, atol=1e-5)


class FakeVision:
    """Per-budget graphs (not shared) with a TensorRT-like max batch; records each call."""

    shared, max_batch = False, 2

    def __init__(self) -> None:
        self.calls: list[tuple[int, list[int]]] = []

    def encode(self, x, budgets):
        self.calls.append((x.shape[0], list(budgets)))
        return {t: np.repeat(x[:, :1, :1, :1].astype(np.float32), t, axis=1)[..., 0] for t in budgets}


def test_per_budget_graphs_group_by_budget_and_respect_max_batch():
    fake = FakeVision()
    xs = [np.full((1, 4, 4, 3), i, np.uint8) for i in range(5)]
    feats, calls = encode_images(fake, xs, [9, 9, 9, 36, 9])
    assert calls == 3 and sorted(fake.calls) == [(1, [36]), (2, [9]), (2, [9])]
    assert [(f.shape[0], float(f[0, 0])) for f in feats] == [(9, 0), (9, 1), (9, 2), (36, 3), (9, 4)]


# ---- the context ----------------------------------------------------------------------------------


def test_a_prompt_over_the_context_names_every_images_tokens(pipe, frames):
    words = "word " * (pipe.decoder.max_len - 150)
    with pytest.raises(
        ContextError, match=r"\+ 288 visual tokens \(2 images: 144 \+ 144\) \+ max_new_tokens 8"
    ):
        pipe.ask(frames[:2], words, tokens=144, max_new_tokens=8)


# ---- the server -----------------------------------------------------------------------------------


def data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def png(frame: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="PNG")
    return buf.getvalue()


def parts(images: list[bytes], text: str = PROMPT) -> list[dict]:
    content = [{"type": "text", "text": text}]
    content += [{"type": "image_url", "image_url": {"url": data_uri(b)}} for b in images]
    return [{"role": "user", "content": content}]


@pytest.fixture(scope="module")
def server(pipe):
    pytest.importorskip("starlette")
    from runtime.serve.server import ServerConfig, make_server, start_in_thread

    srv = make_server(pipe, ServerConfig(host="127.0.0.1", port=0))
    thread = start_in_thread(srv)
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def client(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_the_server_takes_several_image_url_parts_in_order(server, client, pipe, frames):
    images = [png(f) for f in frames[:2]]
    want = pipe.ask(images, PROMPT, tokens=[9, 36], max_new_tokens=6)
    r = client.chat.completions.create(
        model=server.model, messages=parts(images), max_tokens=6, extra_body={"visual_tokens": [9, 36]}
    )
    u = r.usage.model_dump()
    assert r.choices[0].message.content == want.answer
    assert u["visual_token_budgets"] == [9, 36] and u["visual_tokens"] == 36
    assert u["prompt_tokens"] == want.prompt_tokens
    swapped = client.chat.completions.create(
        model=server.model, messages=parts(images[::-1]), max_tokens=6, extra_body={"visual_tokens": [9, 36]}
    )
    flipped = pipe.ask(images[::-1], PROMPT, tokens=[9, 36], max_new_tokens=6)
    assert swapped.choices[0].message.content == flipped.answer  # the order is the parts' order


def test_images_across_user_messages_keep_their_turns(server, client, pipe, frames):
    a, b = png(frames[0]), png(frames[1])
    msgs = [*parts([a], "First?"), {"role": "assistant", "content": "A."}, *parts([b], "And now?")]
    turns = [
        {"from": "human", "value": "<image>\nFirst?"},
        {"from": "gpt", "value": "A."},
        {"from": "human", "value": "<image>\nAnd now?"},
    ]
    want = pipe.ask([a, b], turns, tokens=9, max_new_tokens=6)
    r = client.chat.completions.create(
        model=server.model, messages=msgs, max_tokens=6, extra_body={"visual_tokens": 9}
    )
    assert r.choices[0].message.content == want.answer
    assert r.usage.model_dump()["visual_token_budgets"] == [9, 9]


def test_the_server_refuses_what_does_not_add_up(server, client, frames):
    import openai

    images = [png(f) for f in frames[:2]]
    cases = [
        ({"messages": parts(images), "extra_body": {"visual_tokens": [9, 9, 9]}}, "'visual_tokens' lists 3"),
        ({"messages": parts(images, "<image> only one placeholder")}, r"1 <image> placeholder\(s\) for 2"),
        ({"messages": parts([])}, "1 to 32 images per conversation; got 0"),
    ]
    for kw, match in cases:
        with pytest.raises(openai.BadRequestError, match=match):
            client.chat.completions.create(model=server.model, max_tokens=2, **kw)


def test_two_images_over_the_context_are_a_400_with_the_numbers(server, client, pipe, frames):
    import openai

    words = "word " * (pipe.decoder.max_len - 150)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=server.model,
            messages=parts([png(f) for f in frames[:2]], words),
            max_tokens=8,
            extra_body={"visual_tokens": 144},
        )
    err = e.value.body
    assert e.value.status_code == 400 and err["param"] == "messages"
    msg = err["message"]
    assert "+ 288 visual tokens (2 images: 144 + 144) + max_tokens 8" in msg
    assert f"context is {pipe.decoder.max_len} tokens" in msg and "send fewer images" in msg


# ---- the CLI ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli_bundle(tiny_bundle, tmp_path_factory):
    return shutil.copytree(tiny_bundle, tmp_path_factory.mktemp("cli-multi") / "b")


@pytest.fixture(scope="module")
def files(frames, tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("frames")
    paths = []
    for i, f in enumerate(frames):
        (root / f"f{i}.png").write_bytes(png(f))
        paths.append(str(root / f"f{i}.png"))
    gif = root / "clip.gif"
    ims = [Image.fromarray(np.full((48, 64, 3), 20 * i, np.uint8)) for i in range(10)]
    ims[0].save(gif, save_all=True, append_images=ims[1:], duration=40)
    return [*paths, str(gif)]


def cli(bundle, *flags: str) -> int:
    from runtime.__main__ import main

    return main(["ask", "--bundle", str(bundle), "--prompt", PROMPT, "--max-new-tokens", "2", *flags])


def test_the_cli_takes_two_image_flags(cli_bundle, files, capsys):
    assert cli(cli_bundle, "--image", files[0], "--image", files[1], "--tokens", "9,36", "--json") == 0
    out = json.loads(capsys.readouterr().out)[0]
    assert out["budgets"] == [9, 36] and out["budget"] == 36
    assert cli(cli_bundle, "--image", files[0], "--image", files[1], "--tokens", "9") == 0
    assert "per image, newest last: 9, 9" in capsys.readouterr().out


def test_the_cli_answers_a_video_as_frames_or_one_collage(cli_bundle, files, capsys):
    video = ["--video", files[-1], "--tokens", "1", "--json"]
    assert cli(cli_bundle, *video, "--frames", "4") == 0
    assert json.loads(capsys.readouterr().out)[0]["budgets"] == [1, 1, 1, 1]
    assert cli(cli_bundle, *video, "--video-mode", "collage") == 0
    assert json.loads(capsys.readouterr().out)[0]["budgets"] == [1]


def test_the_cli_says_what_is_wrong(cli_bundle, files, capsys, tmp_path):
    mp4 = tmp_path / "clip.mp4"
    mp4.write_bytes(b"not a video")
    assert cli(cli_bundle, "--video", str(mp4)) == 2
    assert "imageio[pyav]" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli(cli_bundle, "--image", files[0], "--image", files[1], "--escalate", "9,144")
    assert "--escalate answers about one image" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli(cli_bundle, "--image", files[0], "--video", files[-1])
    assert "not allowed with argument" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli(cli_bundle, "--image", files[0], "--frames", "4")
    assert "--frames applies to --video only" in capsys.readouterr().err


def test_the_batching_measurement_counts_calls_and_renders(pipe):
    from runtime.tools.batching import batching, to_markdown

    rows = batching(pipe, [1, 2], runs=1, tokens=9, width=64, height=48)
    assert [(r["n"], r["calls"]) for r in rows] == [(1, 1), (2, 1), (2, 2)]  # mixed sizes: a call each
    assert all(r["batched_ms"] > 0 and r["single_ms"] > 0 and r["ttft_9_ms"] > 0 for r in rows)
    md = to_markdown(rows, 9, pipe.vision.name, 1)
    assert "| 2 x 64x48 | 1 |" in md and "| 2 mixed sizes | 2 |" in md
