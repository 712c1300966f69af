# knowstream developer commands. `make up` starts the embedded stack; `make test` runs the tests.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
GEN := services/gen
PROTOS := $(shell find protos -name '*.proto')
STAMP := $(VENV)/.installed

.PHONY: help setup proto up down status bootstrap test test-unit test-integration lint fmt typecheck bench bench-anchors clean

help:
	@echo "make setup   create $(VENV) and install everything (pinned)"
	@echo "make up      start broker, Redis (if none answers) and every service; waits for SERVING"
	@echo "make down    stop what 'make up' started"
	@echo "make status  show each component"
	@echo "make bootstrap  ingest the labelled PubMedQA items and make the loop's adapter live"
	@echo "make test    run the test suite (starts its own stack on free ports)"
	@echo "make lint    ruff + ruff format --check + mypy"
	@echo "make bench   run the benchmarks against the running stack"

$(STAMP): requirements.txt requirements-nodeps.txt requirements-source.txt pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -U pip
	# torch first, alone and pinned: any other spec would pull the CUDA build from the index.
	$(PIP) install "torch==2.13.0"
	$(PIP) install -r requirements.txt
	$(PIP) install --no-deps -r requirements-nodeps.txt
	DS_BUILD_OPS=0 $(PIP) install --no-build-isolation --no-deps -r requirements-source.txt
	$(PIP) install --no-deps -e .
	# Generated protobuf modules live in $(GEN) (not committed); make them importable.
	echo "$(CURDIR)/$(GEN)" > $$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/knowstream-gen.pth
	touch $(STAMP)

setup: $(STAMP) proto

$(GEN)/.stamp: $(PROTOS) $(STAMP)
	rm -rf $(GEN) && mkdir -p $(GEN)
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=$(GEN) --pyi_out=$(GEN) \
		--grpc_python_out=$(GEN) $(PROTOS)
	find $(GEN)/knowstream -type d -exec touch {}/__init__.py \;
	touch $@

proto: $(GEN)/.stamp

up: setup
	$(PY) -m deploy.stack up

down:
	@test -x $(PY) && $(PY) -m deploy.stack down || echo "nothing to stop (no $(VENV))"

status:
	$(PY) -m deploy.stack status

# The first adapter, out of the box: the trainer trains it on the labelled PubMedQA items (its
# eval split held out), the gate checks it against the base model, and it goes live (no shadow
# phase: there is no live traffic to mirror yet). About 10 minutes on 2 CPU cores.
LABELLED ?= ../shared/data/pubmedqa/labeled.json
bootstrap: setup
	$(PY) -m services.cli.main --timeout 3600 train --data $(LABELLED) --ingest --parent base --promote \
		--reason "bootstrap: the labelled PubMedQA items"

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

test-unit: setup
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

test-integration: setup
	$(PY) -m pytest tests/integration $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

fmt: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: setup
	$(PY) -m bench.retrieval --data ../shared/data/pubmedqa/labeled.json --json
	$(PY) -m bench.freshness --json
	$(PY) -m bench.search --json
	$(PY) -m bench.serving --json
	$(PY) -m bench.drift --json
	$(PY) -m bench.training --json

# alibi-detect (the drift benchmark's comparison) pins transformers<5: its own venv, with torch
# from the same local CPU wheel.
ANCHORS := bench/.venv-anchors
bench-anchors: $(ANCHORS)/.installed

$(ANCHORS)/.installed:
	test -x $(ANCHORS)/bin/python || $(PYTHON) -m venv $(ANCHORS)
	$(ANCHORS)/bin/pip install -q "torch==2.13.0"
	$(ANCHORS)/bin/pip install -q "alibi-detect[torch]==0.13.0" "numpy<2"
	touch $@

clean:
	rm -rf $(GEN) .run .pytest_cache .mypy_cache .ruff_cache
