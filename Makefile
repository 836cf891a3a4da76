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

# Inverts the example photo with the tiny RANDOM-weight model (no weights can be downloaded
# here), prints the file's metadata, writes the reconstruction, two edits and the attention
# maps. See README for real SD.
demo: install
	$(VENV)/bin/nulltext invert examples/red_ball.png --prompt "a red ball on the grass" \
		--model tiny --size 128 --check --force -o $(OUT)/red_ball.safetensors
	$(VENV)/bin/nulltext info $(OUT)/red_ball.safetensors | head -n 16
	$(VENV)/bin/nulltext reconstruct $(OUT)/red_ball.safetensors --force -o $(OUT)/red_ball_reconstruction.png
	$(VENV)/bin/nulltext edit $(OUT)/red_ball.safetensors --target "a green ball on the grass" \
		--target "a red ball on the snow" --blend ball ball --force -o $(OUT)/red_ball_edits
	$(VENV)/bin/nulltext attention $(OUT)/red_ball.safetensors --force -o $(OUT)/red_ball_attention.png

test: install
	$(PY) -m pytest -q

clean:
	rm -rf $(OUT) .pytest_cache
