# Two commands do the whole set-up on a fresh machine: `make demo` and `make test`.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.attnzoo-installed

.PHONY: demo test lint bench data checkpoints clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch/torchvision are pinned to the releases served from this machine's disk.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

# Embedded default data (design §3): Debian packages, installed when we are root.
data:
	@if [ -d /usr/share/datasets/fashion-mnist ] && [ -f /usr/share/doc/jargon-text/jargon.txt.gz ]; then \
		echo "data: Fashion-MNIST and jargon-text already installed"; \
	elif [ "$$(id -u)" = 0 ]; then \
		(apt-get install -y -q dataset-fashion-mnist jargon-text >/dev/null 2>&1 || \
		 (apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist jargon-text >/dev/null)) && \
		echo "data: installed dataset-fashion-mnist jargon-text"; \
	else \
		echo "data: not root; run 'sudo apt-get install -y dataset-fashion-mnist jargon-text'"; \
		echo "      (or let torchvision download Fashion-MNIST where the network allows)"; \
	fi

demo: $(STAMP) data
	$(BIN)/python -m attnzoo.train.demo

test: $(STAMP) data
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -n 2 -q tests

# The shipped checkpoints (attnzoo/zoo/weights): recipe:tag pairs, each trained and measured by
# attnzoo.train.publish on this machine's CPU (see the model cards for the times). The detector starts from the
# nat_mini checkpoint, so it comes after that one.
CHECKPOINTS := series/classify:waves fmnist/crossvit_mini:fmnist fmnist/vit_linear:fmnist fmnist/vit_moh:fmnist \
	text/lm_char:pydoc fmnist/nat_mini:fmnist fmnist/davit_mini:fmnist fmnist/halonet_mini:fmnist \
	det/fcos_nat_mini:fmnist

checkpoints: $(STAMP) data
	@for pair in $(CHECKPOINTS); do \
		$(BIN)/python -m attnzoo.train.publish --config configs/$${pair%%:*}.yaml --tag $${pair##*:} \
			--trainer.enable_progress_bar=false || exit 1; \
	done

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)  # every benchmark in turn (each writes its sections of docs/benchmarks.md)
	for script in attention local linear moh models checkpoints; do \
		$(BIN)/python benchmarks/$$script.py || exit 1; \
	done

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
