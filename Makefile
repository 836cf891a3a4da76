# One command for the main job (`make demo`) and one for the tests (`make test`); each creates
# the virtualenv and installs PyTorch first, on its own, then nulltext.
#
# TORCH is the torch requirement and TORCH_INDEX pip's extra options for it. The default asks pip's
# configured sources for torch==2.13.0: from plain PyPI on Linux x86_64 that is the CUDA build, which
# pulls triton and 15 nvidia-* packages (about 2.7 GB of downloads for Python 3.11). For the CPU-only
# wheel (about 190 MB), on a machine without a GPU:
#     make demo TORCH_INDEX="--index-url https://download.pytorch.org/whl/cpu"
# and for another CUDA build, the index URL that pytorch.org gives for it. Both apply when make
# installs (a new $(VENV), or pyproject.toml changed): remove $(VENV) to choose again.
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
OUT ?= out

.PHONY: install demo test test-fast test-weights lint docs clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	@echo "Installing $(TORCH) $(if $(strip $(TORCH_INDEX)),with pip options: $(TORCH_INDEX),from pip's configured sources (plain PyPI on Linux x86_64: the CUDA build, several GB; the CPU-only wheel: TORCH_INDEX=\"--index-url https://download.pytorch.org/whl/cpu\"))"
	$(PY) -m pip install --quiet $(TORCH_INDEX) "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

install: $(VENV)/.installed

# The main job on the shipped demo model (trained by nulltext on procedural scenes; runs offline on
# a CPU in under a minute): invert a scene, print the file's metadata, write a colour swap and a
# shape swap with local blend, and the attention maps. README shows the same commands.
demo: install
	$(VENV)/bin/nulltext invert examples/red_circle.png --prompt "a red circle on a blue background" \
		--model demo --check --force -o $(OUT)/red_circle.safetensors
	$(VENV)/bin/nulltext info $(OUT)/red_circle.safetensors | head -n 16
	$(VENV)/bin/nulltext edit $(OUT)/red_circle.safetensors --target "a green circle on a blue background" \
		--target "a red square on a blue background" --blend circle circle,square --force -o $(OUT)/red_circle_edits
	$(VENV)/bin/nulltext attention $(OUT)/red_circle.safetensors --force -o $(OUT)/red_circle_attention.png
	@echo
	@echo "Results are in $(OUT)/. To run nulltext yourself, activate its environment first:"
	@echo "    . $(VENV)/bin/activate"

# ruff over the code, tests, benchmarks and scripts (its settings are in pyproject.toml).
lint: install
	$(VENV)/bin/ruff check src tests benchmarks scripts examples

# docs/cli.md's option tables, regenerated from the configs' options (tests/test_options.py checks them).
docs: install
	$(PY) -m nulltext.cli.docs

# The full suite (what CI runs).
test: install
	$(PY) -m pytest -q

# Everything but the tests marked slow: a couple of minutes on a 2-core CPU.
test-fast: install
	$(PY) -m pytest -q -m "not slow"

# Real Stable Diffusion weights: NULLTEXT_SD_MODEL=/path/to/stable-diffusion-v1-4 make test-weights
# (a hub id works too, with network access). The photo is scikit-image's cat, or NULLTEXT_SD_PHOTO.
test-weights: install
	@test -n "$$NULLTEXT_SD_MODEL" || { echo "set NULLTEXT_SD_MODEL to a Stable Diffusion 1.x folder or hub id"; exit 2; }
	$(PY) -m pip install --quiet -e ".[test,weights]"
	$(PY) -m pytest -q -m weights -rs

clean:
	rm -rf $(OUT) .pytest_cache
