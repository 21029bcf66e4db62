"""Type-check the TensorRT code against tensorrt-stubs, for real.

    python -m export.typecheck [FILES...]     (default: the TensorRT code, DEFAULT_FILES)

Plain `mypy export/trt.py` passes vacuously: tensorrt-stubs 10.13 installs `tensorrt/*.pyi`
without a py.typed marker, so mypy (with ignore_missing_imports) types `tensorrt` as Any;
and its tensorrt_bindings/tensorrt.pyi has syntax errors (parameters named `in`, a
non-default parameter after defaults). This copies the stubs into a cache folder, repairs
those lines, and runs mypy with that folder on MYPYPATH, so every TensorRT call is checked.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

DEFAULT_FILES = ("export/engines.py", "export/engine_inputs.py", "export/gates.py", "runtime/vision.py")
STUB_DIRS = ("tensorrt", "tensorrt_bindings")
# Our files strict enough to catch misuse of the API; the stubs' own remaining flaws are not ours to report.
MYPY_INI = """[mypy]
python_version = 3.11
ignore_missing_imports = True
follow_imports = silent
check_untyped_defs = True

[mypy-tensorrt.*,tensorrt_bindings.*]
ignore_errors = True
"""


def installed_stubs() -> Path:
    site = Path(sysconfig.get_paths()["purelib"])
    if not (site / "tensorrt_bindings" / "tensorrt.pyi").is_file():
        raise SystemExit(
            "tensorrt-stubs not installed: pip install --no-deps -c constraints.txt tensorrt-stubs==10.13.0.35.1"
        )
    return site


def repair(text: str) -> str:
    """Make the 10.13 stub parse: `in:` parameters renamed, a required parameter after defaults defaulted."""
    text = re.sub(r"([(,]\s*)in: ", r"\1in_: ", text)
    # `bool: DataType` at module level shadows builtins.bool in every annotation of the stub.
    text = re.sub(r"^bool: DataType.*$", "", text, flags=re.MULTILINE)
    return text.replace(
        "power: Weights = None, channel_axis: int)", "power: Weights = None, channel_axis: int = ...)"
    )


def patched_stubs(dest: Path) -> Path:
    site = installed_stubs()
    for name in STUB_DIRS:
        for src in (site / name).glob("*.pyi"):
            out = dest / name / src.name
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(repair(src.read_text()))
    return dest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m export.typecheck", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "files", nargs="*", default=list(DEFAULT_FILES), help="files to check (default: the TensorRT code)"
    )
    files = p.parse_args(argv).files
    stubs = patched_stubs(Path(".mypy_cache") / "tensorrt-stubs-repaired")
    config = stubs / "mypy.ini"
    config.write_text(MYPY_INI)
    env = {**os.environ, "MYPYPATH": str(stubs.resolve())}
    cmd = [sys.executable, "-m", "mypy", "--config-file", str(config), *files]
    res = subprocess.run(cmd, env=env)
    if res.returncode == 0:
        print(f"typed against tensorrt-stubs (repaired copy in {stubs}): {', '.join(files)}")
    return res.returncode


if __name__ == "__main__":
    raise SystemExit(main())
