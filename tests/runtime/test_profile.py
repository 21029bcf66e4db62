"""Latency profiles: device keys, round trip, and refusal of other devices' profiles."""

from __future__ import annotations

import json
import subprocess

import pytest

from runtime.profile import (
    Profile,
    ProfileError,
    device_info,
    device_key,
    fit_line,
    load_profile,
    save_profile,
)


def test_fit_line_recovers_a_line():
    pts = [(n, 3.0 + 0.25 * n) for n in (10, 50, 100, 600)]
    b0, b1 = fit_line(pts)
    assert (b0, b1) == (pytest.approx(3.0), pytest.approx(0.25))


def test_device_info_here_names_the_cpu_and_provider():
    info = device_info("CPUExecutionProvider")
    assert info["provider"] == "CPUExecutionProvider" and info["cpu"]
    assert "gpu" not in info


@pytest.fixture
def fake_nvidia_smi(monkeypatch):
    """nvidia-smi 'installed' and answering; the commands run are recorded, none executed."""
    import runtime.profile as profile

    ran: list[list[str]] = []

    def run(cmd, **kw):
        ran.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, stdout="NVIDIA H200\n", stderr="")

    monkeypatch.setattr(profile.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(profile.subprocess, "run", run)
    monkeypatch.setattr(profile, "is_jetson", lambda: False)
    return ran


def test_a_cpu_provider_never_runs_nvidia_smi(fake_nvidia_smi):
    info = device_info("CPUExecutionProvider")
    assert fake_nvidia_smi == [] and "gpu" not in info


def test_a_gpu_provider_names_the_gpu(fake_nvidia_smi):
    info = device_info("CUDAExecutionProvider")
    assert fake_nvidia_smi[0][0] == "nvidia-smi" and info["gpu"] == "NVIDIA H200"


def test_the_pipeline_passes_the_provider_not_the_backend_name(pipe, fake_nvidia_smi):
    from runtime.pipeline import Pipeline

    assert (pipe.vision.name, pipe.device["provider"]) == ("ort-cpu", "CPUExecutionProvider")
    again = Pipeline(pipe.bundle_dir, pipe.manifest, pipe.vision, pipe.decoder, pipe.tokenizer)
    assert fake_nvidia_smi == [] and again.device == pipe.device


def test_device_key_includes_gpu_and_jetson_power_mode():
    base = {"cpu": "ARMv8", "machine": "aarch64", "provider": "TensorRT", "gpu": "Orin", "tensorrt": "10.3"}
    maxn = device_key({**base, "power_mode": "MAXN"})
    w15 = device_key({**base, "power_mode": "15W"})
    assert maxn != w15 and "orin" in maxn and "pmmaxn" in maxn
    cpu = {"cpu": "AMD EPYC", "machine": "x86_64", "provider": "CPUExecutionProvider"}
    assert device_key(cpu) == "amd-epyc-cpuexecutionprovider"


def test_round_trip(tmp_path, synthetic_profile):
    prof = Profile.from_dict(synthetic_profile.to_dict())
    path = save_profile(tmp_path, prof)
    assert path.name == f"profile-{prof.key}.json"
    back = load_profile(tmp_path, prof.device, prof.backend)
    assert back.to_dict() == prof.to_dict()


def test_missing_profile_says_how_to_make_one(tmp_path, synthetic_profile):
    with pytest.raises(ProfileError, match="python -m runtime profile --bundle"):
        load_profile(tmp_path, synthetic_profile.device, "ort-cpu")


def test_profile_of_another_power_mode_is_not_used(tmp_path, synthetic_profile):
    dev = {
        "cpu": "ARMv8",
        "machine": "aarch64",
        "provider": "CUDAExecutionProvider",
        "gpu": "Orin",
        "power_mode": "MAXN",
        "tensorrt": "10.3",
    }
    prof = Profile.from_dict(synthetic_profile.to_dict())
    prof.device = dev
    save_profile(tmp_path, prof)
    with pytest.raises(ProfileError, match="other devices"):
        load_profile(tmp_path, {**dev, "power_mode": "15W"}, "ort-cpu")


def test_profile_file_edited_to_another_device_is_refused(tmp_path, synthetic_profile):
    prof = Profile.from_dict(synthetic_profile.to_dict())
    path = save_profile(tmp_path, prof)
    d = json.loads(path.read_text())
    d["device"]["cpu"] = "Some Other CPU"
    path.write_text(json.dumps(d))
    with pytest.raises(ProfileError, match="another device"):
        load_profile(tmp_path, prof.device, prof.backend)


def test_profile_of_another_backend_is_refused(tmp_path, synthetic_profile):
    prof = Profile.from_dict(synthetic_profile.to_dict())
    save_profile(tmp_path, prof)
    with pytest.raises(ProfileError, match="vision backend"):
        load_profile(tmp_path, prof.device, "ort-cuda")


def test_malformed_profile_is_refused(tmp_path, synthetic_profile):
    prof = Profile.from_dict(synthetic_profile.to_dict())
    path = save_profile(tmp_path, prof)
    path.write_text('{"schema": 1, "device": {}}')
    with pytest.raises(ProfileError, match="malformed|another device"):
        load_profile(tmp_path, prof.device, prof.backend)


def test_unknown_budget_in_profile_is_an_error(synthetic_profile):
    with pytest.raises(ProfileError, match="no vision latency for budget 16"):
        Profile.from_dict(synthetic_profile.to_dict()).vision(16)
