# Two commands on a fresh machine:  make demo   and   make test
# The install step runs once (a stamp file tracks pyproject.toml). Bring your own torch:
# if `import torch` works, it is kept; otherwise TORCH_SPEC is installed (the CPU wheel
# pip finds first here; on a GPU machine install the CUDA build of your choice first).
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
STAMP := .make/installed

.PHONY: install demo test test-all bench-gpu gpu-check

$(STAMP): pyproject.toml
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install "$(TORCH_SPEC)"
	$(PYTHON) -m pip install -e ".[all]"
	@mkdir -p .make && touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PYTHON) -m moecc demo

test: $(STAMP)
	$(PYTHON) -m pytest -m "not slow" -q --durations=25

test-all: $(STAMP)
	$(PYTHON) -m pytest -q

bench-gpu: $(STAMP)
	$(PYTHON) -m moecc bench --out out/bench --e2e

# The standing GPU checklist (shared DEVICE.md) in one command, <= 8 minutes, runnable from a
# plain checkout on the lent GPU machine (no install: PYTHONPATH=.): correctness first, then the
# benchmark summary on a reduced grid; results.json lands in $OUT (or out/) /gpu-check.
gpu-check:
	PYTHONPATH=. $(PYTHON) -m pytest -m gpu -x -q -p no:cacheprovider
	PYTHONPATH=. $(PYTHON) -m moecc bench --out $${OUT:-out}/gpu-check --tokens 1 16 256 4096 --time-budget 240
