"""Latency profile: what each budget costs on THIS device, and how the device is identified.

A profile is saved in the bundle as `profile-<device key>.json`:

    {"schema": 1, "device": {cpu, machine, provider, gpu?, power_mode?, tensorrt?},
     "key": "amd-epyc-7763-cpuexecutionprovider", "backend": "ort-cpu", "created": ...,
     "preprocess_ms": 3.1,
     "vision_ms": {"576": {"p50": 41.0, "p90": 44.2, "n": 10}, ...},
     "prefill": {"intercept_ms": 1.2, "ms_per_token": 0.05, "points": [[tokens, ms], ...]},
     "decode_ms_per_token": 0.9, "providers": {"vision": [...], "llm": [...]}}

The device identity (CPU model or GPU name, the vision backend's execution provider such as
"CPUExecutionProvider" - not the backend name "ort-cpu", which the profile records apart - and
on Jetson the `nvpmodel` power mode and TensorRT version) is part of the key: a profile
measured on another device or power mode is never used (`load_profile` says why).
torch-free: stdlib + numpy.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import platform
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fmvr.atomic import write_json
from fmvr.provenance import cpu_model

PROFILE_SCHEMA = 1
STAGES = ("preprocess", "vision", "prefill", "decode")


class ProfileError(ValueError):
    """No usable profile: what is wrong and the command that makes one."""


# ---- device identity ------------------------------------------------------------------------


def _run(cmd: list[str]) -> str | None:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def is_jetson() -> bool:
    return Path("/etc/nv_tegra_release").is_file() or Path("/sys/module/tegra_fuse").is_dir()


def gpu_name() -> str | None:
    """The first NVIDIA GPU's name (nvidia-smi), or the Jetson board model."""
    out = _run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"])
    if out:
        return out.splitlines()[0].strip()
    model = Path("/proc/device-tree/model")
    if is_jetson() and model.is_file():
        return model.read_bytes().rstrip(b"\0").decode(errors="replace").strip()
    return None


def power_mode() -> str | None:
    """Jetson power mode from `nvpmodel -q` (e.g. "MAXN" or "15W"), None elsewhere."""
    out = _run(["nvpmodel", "-q"])
    if not out:
        return None
    m = re.search(r"NV Power Mode:\s*(\S+)", out)
    return m.group(1) if m else out.splitlines()[0].strip()


def tensorrt_version() -> str | None:
    """Installed TensorRT's version without importing it (None when absent)."""
    for dist in ("tensorrt", "tensorrt-libs", "tensorrt_libs"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


CPU_PROVIDERS = ("cpuexecutionprovider", "cpu")


def device_info(provider: str) -> dict[str, str]:
    """What identifies this device for a profile.

    `provider`: the vision backend's execution provider (`VisionBackend.provider`, e.g.
    "CPUExecutionProvider", "CUDAExecutionProvider", "TensorRT"), not its name ("ort-cpu").
    On a CPU provider no GPU is queried (nvidia-smi is not run)."""
    info = {"cpu": cpu_model(), "machine": platform.machine(), "provider": provider}
    if provider.lower() not in CPU_PROVIDERS:
        gpu = gpu_name()
        if gpu:
            info["gpu"] = gpu
    if is_jetson():
        info["power_mode"] = power_mode() or "unknown"
        info["tensorrt"] = tensorrt_version() or "none"
    return info


def device_key(info: dict[str, str]) -> str:
    """A file-name-safe key: GPU (or CPU) model, provider, power mode."""
    parts = [info.get("gpu") or info["cpu"], info["provider"]]
    if "power_mode" in info:
        parts += [f"pm{info['power_mode']}", f"trt{info.get('tensorrt', 'none')}"]
    slug = re.sub(r"[^a-z0-9.]+", "-", "-".join(parts).lower()).strip("-")
    return slug[:120]


# ---- the profile -----------------------------------------------------------------------------


@dataclass
class Profile:
    device: dict[str, str]
    backend: str
    vision_ms: dict[int, dict[str, float]]  # budget -> {p50, p90, n}
    prefill_intercept_ms: float
    prefill_ms_per_token: float
    decode_ms_per_token: float
    preprocess_ms: float = 0.0
    prefill_points: list[list[float]] = field(default_factory=list)
    created: str = ""
    # {"vision": [...], "llm": [...]}: the providers the sessions actually got when measured
    providers: dict[str, list[str]] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return device_key(self.device)

    def vision(self, budget: int) -> float:
        if budget not in self.vision_ms:
            raise ProfileError(
                f"the profile has no vision latency for budget {budget} "
                f"(has {sorted(self.vision_ms, reverse=True)}); re-run `python -m runtime profile`"
            )
        return self.vision_ms[budget]["p50"]

    def prefill(self, prompt_tokens: int) -> float:
        return max(0.0, self.prefill_intercept_ms + self.prefill_ms_per_token * prompt_tokens)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": PROFILE_SCHEMA,
            "device": self.device,
            "key": self.key,
            "backend": self.backend,
            "created": self.created,
            "preprocess_ms": self.preprocess_ms,
            "vision_ms": {str(t): v for t, v in self.vision_ms.items()},
            "prefill": {
                "intercept_ms": self.prefill_intercept_ms,
                "ms_per_token": self.prefill_ms_per_token,
                "points": self.prefill_points,
            },
            "decode_ms_per_token": self.decode_ms_per_token,
            "providers": self.providers,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Profile:
        if d.get("schema") != PROFILE_SCHEMA:
            raise ProfileError(
                f"profile schema {d.get('schema')!r} is not {PROFILE_SCHEMA}; re-run `python -m runtime profile`"
            )
        try:
            return cls(
                device=dict(d["device"]),
                backend=d["backend"],
                vision_ms={int(t): dict(v) for t, v in d["vision_ms"].items()},
                prefill_intercept_ms=float(d["prefill"]["intercept_ms"]),
                prefill_ms_per_token=float(d["prefill"]["ms_per_token"]),
                prefill_points=list(d["prefill"].get("points", [])),
                decode_ms_per_token=float(d["decode_ms_per_token"]),
                preprocess_ms=float(d.get("preprocess_ms", 0.0)),
                created=d.get("created", ""),
                providers={k: list(v) for k, v in d.get("providers", {}).items()},
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ProfileError(f"malformed profile ({e}); re-run `python -m runtime profile`") from e


def profile_path(bundle_dir: str | Path, info: dict[str, str]) -> Path:
    return Path(bundle_dir) / f"profile-{device_key(info)}.json"


def save_profile(bundle_dir: str | Path, profile: Profile) -> Path:
    path = profile_path(bundle_dir, profile.device)
    write_json(path, profile.to_dict(), sort_keys=True)
    return path


def load_profile(bundle_dir: str | Path, info: dict[str, str], backend: str) -> Profile:
    """This device's profile from the bundle; ProfileError saying why none is usable.

    Profiles of other devices / power modes / providers / backends are listed but never used.
    """
    path = profile_path(bundle_dir, info)
    hint = f"measure one here: python -m runtime profile --bundle {bundle_dir}"
    if not path.is_file():
        others = sorted(p.name for p in Path(bundle_dir).glob("profile-*.json"))
        seen = f" (found only profiles of other devices: {', '.join(others)})" if others else ""
        raise ProfileError(f"no latency profile for this device ({device_key(info)}){seen}; {hint}")
    import json

    try:
        prof = Profile.from_dict(json.loads(path.read_text()))
    except json.JSONDecodeError as e:
        raise ProfileError(f"{path} is not valid JSON ({e}); {hint}") from e
    if prof.device != info:
        diff = {k: (prof.device.get(k), info.get(k)) for k in set(prof.device) | set(info)}
        diff = {k: v for k, v in diff.items() if v[0] != v[1]}
        raise ProfileError(f"{path.name} was measured on another device {diff} (profile, here); {hint}")
    if prof.backend != backend:
        raise ProfileError(
            f"{path.name} was measured with vision backend {prof.backend}, this run uses {backend}; {hint}"
        )
    return prof


# ---- fitting -----------------------------------------------------------------------------------


def percentiles(samples: list[float], qs: tuple[int, ...] = (50, 90, 95)) -> dict[str, float]:
    """{"p50": ..., "p90": ..., "p95": ..., "n": count} of samples (ms): the one quantile helper of
    the runtime (profiles, the budget card, runtime latency)."""
    values = np.percentile(np.asarray(samples, dtype=np.float64), qs)
    return {**{f"p{q}": float(v) for q, v in zip(qs, values)}, "n": len(samples)}


def fit_line(points: list[tuple[int, float]]) -> tuple[float, float]:
    """Least-squares (intercept_ms, ms_per_token) through (tokens, ms) points."""
    x = np.asarray([p[0] for p in points], dtype=np.float64)
    y = np.asarray([p[1] for p in points], dtype=np.float64)
    if len(set(x.tolist())) < 2:
        return float(np.median(y)), 0.0
    a = np.stack([np.ones_like(x), x], axis=1)  # [P, 2]
    (b0, b1), *_ = np.linalg.lstsq(a, y, rcond=None)
    return float(b0), float(max(b1, 0.0))


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
