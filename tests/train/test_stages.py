"""Stages are data, all of them: each Stage names the function that runs it and `python -m train`
runs every stage through the table; stage ground's knobs are a record of their own
(TrainConfig.ground), reachable from a JSON config file and from flags, saved and compared."""

from __future__ import annotations

import dataclasses
import inspect
import json
import sys
import types

import pytest

from train import ground, stages
from train.__main__ import main, parse_args
from train.ckpt import same_run
from train.stages import STAGES, GroundOptions, TrainConfig


def test_every_stage_runner_resolves_to_a_function_with_the_one_signature():
    fns = {name: st.runner_fn() for name, st in STAGES.items()}
    assert all(callable(fn) for fn in fns.values())
    assert fns["ground"] is ground.train and fns["stage1"].__module__ == "train.loop"
    sigs = {str(inspect.signature(fn)) for fn in fns.values()}
    assert len(sigs) == 1, sigs
    params = list(inspect.signature(fns["ground"]).parameters.values())
    assert [p.name for p in params] == ["cfg", "resume"] and params[1].default is False
    with pytest.raises(ValueError, match="is not a function"):
        dataclasses.replace(STAGES["stage1"], runner="train.loop:no_such_runner").runner_fn()


def test_a_stage_runs_a_config_of_its_own_only(tmp_path):
    with pytest.raises(ValueError, match="stage ground cannot run a config of stage stage2"):
        STAGES["ground"].run(TrainConfig(out=str(tmp_path)))


def _recorder(calls: list, final):
    def runner(cfg, resume=False):
        calls.append((cfg, resume))
        return final

    return runner


def test_python_m_train_runs_stage_ground_through_the_table(tmp_path, monkeypatch, capsys):
    calls: list = []
    monkeypatch.setattr(ground, "train", _recorder(calls, tmp_path / "g" / "final"))
    assert (
        main(["--stage", "ground", "--out", str(tmp_path / "g"), "--ground-position", "--no-progress"]) == 0
    )
    [(cfg, resume)] = calls
    assert cfg.stage == "ground" and cfg.ground == GroundOptions(position=True) and resume is False
    assert f"trained ground: {tmp_path / 'g' / 'final'}" in capsys.readouterr().out


def test_any_stage_runs_whatever_runner_its_table_entry_names(tmp_path, monkeypatch):
    calls: list = []
    fake = types.ModuleType("fake_runners")
    fake.run = _recorder(calls, tmp_path / "final")
    monkeypatch.setitem(sys.modules, "fake_runners", fake)
    monkeypatch.setitem(STAGES, "stage1", dataclasses.replace(STAGES["stage1"], runner="fake_runners:run"))
    assert main(["--stage", "stage1", "--out", str(tmp_path), "--resume"]) == 0
    assert [(c.stage, r) for c, r in calls] == [("stage1", True)]


def test_the_lm_loop_refuses_a_stage_with_another_runner(tmp_path):
    from train.loop import train_model

    with pytest.raises(ValueError, match="stage ground has its own runner, train.ground:train"):
        train_model(TrainConfig(stage="ground", out=str(tmp_path)).check())


def test_ground_options_round_trip_through_a_config_file_flags_and_the_saved_config(tmp_path):
    conf = tmp_path / "c.json"
    conf.write_text(json.dumps({"stage": "ground", "out": str(tmp_path), "ground": {"position": True}}))
    cfg = TrainConfig.from_sources(str(conf), vars(parse_args([])))
    assert cfg.ground == GroundOptions(position=True, digit=False)
    both = TrainConfig.from_sources(str(conf), vars(parse_args(["--ground-digit"])))
    assert both.ground == GroundOptions(position=True, digit=True)  # a flag sets one knob, the file the other
    off = TrainConfig.from_sources(str(conf), vars(parse_args(["--no-ground-position"])))
    assert off.ground == GroundOptions()
    # what a checkpoint saves (train_config.json) reads back as the same config, as a file and as a dict
    assert cfg.to_dict()["ground"] == {"position": True, "digit": False}
    saved = tmp_path / "train_config.json"
    saved.write_text(json.dumps(both.to_dict()))
    assert TrainConfig.from_sources(str(saved), {}) == both
    assert TrainConfig(**both.to_dict()) == both == TrainConfig.from_dict(json.loads(saved.read_text()))


def test_the_ground_flags_are_generated_from_the_record_with_their_help(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for knob in dataclasses.fields(GroundOptions):
        assert f"--ground-{knob.name}, --no-ground-{knob.name}" in text
    assert "each token's target also holds the words naming where it sits" in text
    assert [n for n, rec, _ in TrainConfig.flag_fields() if rec] == ["ground_position", "ground_digit"]


@pytest.mark.parametrize(
    "bad,match",
    [
        ({"ground": {"colour": True}}, r"unknown keys \['colour'\] in .*'ground'"),
        ({"ground": True}, "'ground' must be an object"),
        ({"ground_position": True}, r"ground_position: a stage's own knobs are a nested object now"),
    ],
)
def test_a_config_file_with_bad_ground_options_is_refused(tmp_path, bad, match):
    conf = tmp_path / "c.json"
    conf.write_text(json.dumps({"stage": "ground", **bad}))
    with pytest.raises(ValueError, match=match):
        TrainConfig.from_sources(str(conf), {})


def test_ground_options_are_refused_with_another_stage(tmp_path, capsys):
    with pytest.raises(ValueError, match="--ground-\\* options apply to stage ground only, not stage2"):
        TrainConfig(out=str(tmp_path), ground=GroundOptions(digit=True)).check()
    assert main(["--stage", "stage1", "--ground-digit", "--out", str(tmp_path)]) == 2
    assert "apply to stage ground only" in capsys.readouterr().err


def _final_with(tmp_path, train_config: dict):
    final = tmp_path / "final"
    final.mkdir(parents=True)
    (final / "extra.json").write_text(json.dumps({"train_config": train_config}))
    return final


def test_same_run_compares_the_nested_options(tmp_path):
    cfg = TrainConfig(stage="ground", out=str(tmp_path), ground=GroundOptions(digit=True)).check()
    final = _final_with(tmp_path, cfg.to_dict())
    assert same_run(final, cfg)
    assert not same_run(final, dataclasses.replace(cfg, ground=GroundOptions()))
    del_knob = cfg.to_dict()
    del del_knob["ground"]["position"]  # saved before a knob was added: the knob's default
    (final / "extra.json").write_text(json.dumps({"train_config": del_knob}))
    assert same_run(final, cfg)


def test_skip_if_done_takes_a_run_saved_with_flat_ground_keys_as_another_run(tmp_path, monkeypatch, capsys):
    old = TrainConfig(stage="ground", out=str(tmp_path)).to_dict()
    del old["ground"]
    old |= {"ground_position": False, "ground_digit": False}  # how runs were saved before GroundOptions
    _final_with(tmp_path, old)
    calls: list = []
    monkeypatch.setattr(ground, "train", _recorder(calls, tmp_path / "final"))
    with pytest.warns(
        UserWarning, match=r"not taken as this run: unknown keys \['ground_digit', 'ground_posi"
    ):
        assert main(["--stage", "ground", "--out", str(tmp_path), "--skip-if-done"]) == 0
    assert len(calls) == 1 and "already trained" not in capsys.readouterr().out


def test_a_ground_knob_reaches_the_ground_targets_and_the_saved_config(tmp_path, monkeypatch, capsys):
    seen: list = []
    real = ground.ground_targets

    def spy(*args, **kw):
        seen.append(kw)
        return real(*args, **kw)

    monkeypatch.setattr(ground, "ground_targets", spy)
    argv = ["--stage", "ground", "--out", str(tmp_path / "g"), "--bench-n", "4", "--batch-size", "4"]
    argv += ["--steps", "1", "--tokens", "9,1", "--no-progress", "--ground-digit"]
    assert main(argv) == 0
    assert seen == [{"position": False, "digit": True}]
    saved = json.loads((tmp_path / "g" / "final" / "extra.json").read_text())["train_config"]
    assert saved["ground"] == {"position": False, "digit": True} and "ground_digit" not in saved
    assert main([*argv, "--skip-if-done"]) == 0
    assert "already trained with this config" in capsys.readouterr().out
    assert len(seen) == 1
    cfg = TrainConfig.from_sources(None, vars(parse_args(argv)))
    assert not same_run(tmp_path / "g" / "final", dataclasses.replace(cfg, ground=GroundOptions()))


def test_the_shared_helpers_are_public_in_one_module():
    import train.common as common
    import train.loop as loop

    names = (
        "autocast",
        "progress_bar",
        "log_step",
        "build_model_and_tokenizer",
        "make_optimizer",
        "step_indices",
    )
    assert all(callable(getattr(common, n)) for n in names)
    for n in names:  # the loops use the shared ones, not copies
        for mod in (loop, ground):
            if hasattr(mod, n):
                assert getattr(mod, n) is getattr(common, n), (mod.__name__, n)
    assert not [n for n in vars(loop) if n in ("_autocast", "_bar", "_log")]
    assert stages.option_records() == {"ground": GroundOptions}
