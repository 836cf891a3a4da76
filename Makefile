# One command for the main job (`make demo`) and one for the tests (`make test`); each creates
# the virtualenv and installs PyTorch 2.13.0 (CPU build) first, then nulltext.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
OUT ?= out

.PHONY: install demo test clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

install: $(VENV)/.installed

# The main job on the shipped demo model (trained by nulltext on procedural scenes; runs offline on
# a CPU in under a minute): invert a scene, print the file's metadata, write the reconstruction,
# a colour swap and a shape swap with local blend, and the attention maps. README shows the same
# commands for real photos with Stable Diffusion v1.4.
demo: install
	$(VENV)/bin/nulltext invert examples/red_circle.png --prompt "a red circle on a blue background" \
		--model demo --check --force -o $(OUT)/red_circle.safetensors
	$(VENV)/bin/nulltext info $(OUT)/red_circle.safetensors | head -n 16
	$(VENV)/bin/nulltext edit $(OUT)/red_circle.safetensors --target "a green circle on a blue background" \
		--target "a red square on a blue background" --blend circle circle,square --force -o $(OUT)/red_circle_edits
	$(VENV)/bin/nulltext attention $(OUT)/red_circle.safetensors --force -o $(OUT)/red_circle_attention.png

test: install
	$(PY) -m pytest -q

clean:
	rm -rf $(OUT) .pytest_cache
