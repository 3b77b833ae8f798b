# The two commands of the README:
#   make demo   set up, pretrain SimMIM on Fashion-MNIST (~5 min on 2 CPU cores), evaluate
#   make test   set up, build the docs site (mkdocs --strict), run the test suite
# and for the docs: make docs serves them at http://127.0.0.1:8000
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
RUN    ?= runs/demo-$(shell date +%Y%m%d-%H%M%S)
export OMP_NUM_THREADS ?= 2
SITE   := .site
# mkdocs-material prints a banner about its successor on every build otherwise
export NO_MKDOCS_2_WARNING = 1

.PHONY: setup data demo test docs lint clean

setup: $(VENV)/.installed data

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

data:
	@sh scripts/get_fashion_mnist.sh

demo: setup
	$(BIN)/mimar pretrain configs/simmim/vit_tiny_fmnist.yaml --run-dir $(RUN)
	$(BIN)/mimar eval knn linear --checkpoint $(RUN) --baselines
	@echo "run folder: $(RUN)  (config.yaml, metrics.jsonl, checkpoints/, reconstruction.png, eval/)"

test: setup
	$(BIN)/mkdocs build --strict --quiet --site-dir $(SITE)
	$(BIN)/python -m pytest -q -n 2 tests

docs: setup
	$(BIN)/mkdocs serve

lint: setup
	$(BIN)/ruff check mimar tests benchmarks
	$(BIN)/ruff format --check mimar tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache $(SITE)
