# knowstream developer commands. `make up` starts the embedded stack; `make test` runs the tests.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
GEN := services/gen
PROTOS := $(shell find protos -name '*.proto')
STAMP := $(VENV)/.installed
# DeepSpeed's native ops, built where training processes look for them (KS_CACHE_DIR).
NATIVE_OPS := $(or $(KS_CACHE_DIR),.cache)/torch_extensions/.built
# llama.cpp (the default engine runtime) is built for this CPU without AMX (deploy/llama_build.py
# says why), into a wheel directory named by the build's options: pip's own wheel cache is keyed
# by the sdist alone and may hold a -march=native build.
LLAMA_CPP := llama-cpp-python==0.3.36
LLAMA_WHEELS := $(or $(KS_CACHE_DIR),.cache)/wheels

.PHONY: help setup proto up down clean-data status bootstrap demo test test-unit test-integration lint fmt docs typecheck bench bench-anchors clean

help:
	@echo "make setup   create $(VENV) and install everything (pinned)"
	@echo "make up      start the broker on its log on disk, the stack's own durable Redis and every service; waits for SERVING"
	@echo "make up PROMETHEUS=1  the same, plus a Prometheus scraping every service (.run/prometheus)"
	@echo "make down    stop what 'make up' started (its data stays under .run/)"
	@echo "make clean-data  make down, then remove the stack's data (broker log, Redis, adapters, trainer jobs)"
	@echo "make status  show each component"
	@echo "make bootstrap  ingest the labelled PubMedQA abstracts, learn 50 of them, make it live"
	@echo "make demo    the loop end to end on a fresh stack (make clean-data first), ~6 min"
	@echo "make test    run the test suite (starts its own stack on free ports)"
	@echo "make lint    ruff + ruff format --check + mypy"
	@echo "make docs    regenerate README.md's settings reference from the settings classes"
	@echo "make bench   run the benchmarks against the running stack"

$(STAMP): requirements.txt requirements-nodeps.txt requirements-source.txt pyproject.toml deploy/llama_build.py
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -U pip
	# torch first, alone and pinned: any other spec would pull the CUDA build from the index.
	$(PIP) install "torch==2.13.0"
	$(PIP) install -r requirements.txt
	$(PIP) install --no-deps -r requirements-nodeps.txt
	args="$$($(PY) deploy/llama_build.py)"; \
	dir="$(LLAMA_WHEELS)/llama-$$(echo "$(LLAMA_CPP) $$args" | sha256sum | cut -c1-12)"; \
	ls "$$dir"/*.whl >/dev/null 2>&1 || \
		CMAKE_ARGS="$$args" $(PIP) wheel --no-deps --no-cache-dir -w "$$dir" "$(LLAMA_CPP)"; \
	$(PIP) install --no-deps --force-reinstall "$$dir"/*.whl
	DS_BUILD_OPS=0 $(PIP) install --no-build-isolation --no-deps -r requirements-source.txt
	$(PIP) install --no-deps -e .
	# Generated protobuf modules live in $(GEN) (not committed); make them importable.
	echo "$(CURDIR)/$(GEN)" > $$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/knowstream-gen.pth
	touch $(STAMP)

# The first training job would otherwise compile them, under a lock that a job killed meanwhile
# leaves behind (see services/trainer/native_ops.py).
$(NATIVE_OPS): $(STAMP)
	DS_ACCELERATOR=cpu $(PY) -m services.trainer.native_ops build
	touch $@

setup: $(STAMP) $(NATIVE_OPS) proto

$(GEN)/.stamp: $(PROTOS) $(STAMP)
	rm -rf $(GEN) && mkdir -p $(GEN)
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=$(GEN) --pyi_out=$(GEN) \
		--grpc_python_out=$(GEN) $(PROTOS)
	find $(GEN)/knowstream -type d -exec touch {}/__init__.py \;
	touch $@

proto: $(GEN)/.stamp

up: setup
	$(if $(PROMETHEUS),KS_PROMETHEUS=$(PROMETHEUS)) $(PY) -m deploy.stack up

down:
	@test -x $(PY) && $(PY) -m deploy.stack down || echo "nothing to stop (no $(VENV))"

# State survives `make down && make up`; this is the way to start from nothing.
clean-data: down
	$(PY) -m deploy.stack clean-data

status:
	$(PY) -m deploy.stack status

# The first knowledge adapter, out of the box: the labelled PubMedQA abstracts are ingested, the
# trainer learns the newest 50 of them (a fifth held out as control documents), the knowledge
# gate checks it against the base model on probes of those abstracts, and it goes live (no
# shadow phase: there is no live traffic to mirror yet).
LABELLED ?= ../shared/data/pubmedqa/labeled.json
bootstrap: setup
	$(PY) -m services.cli.main --timeout 3600 train --mode knowledge --data $(LABELLED) --ingest \
		--parent base --max-documents 50 --promote \
		--reason "bootstrap: the newest 50 PubMedQA abstracts as knowledge"

# The loop end to end (services/cli/demo.py; README "Demo"): oncology abstracts and questions,
# a shift to cardiology questions whose abstracts are missing (a knowledge gap), those abstracts
# ingested, the gap closed, an adapter trained on them, gated (then shadowed, promoted). Settings
# that keep it within 20 minutes of 2 cores: windows of DEMO_WINDOW questions (an event after
# two drifted ones), knowledge jobs capped at the newest 2 x DEMO_WINDOW documents (the missing
# abstracts, not the first corpus as well), DEMO_PASSES passes (a second pass over 15 abstracts
# cost 5 minutes and raised general-English perplexity 26.6%), DEMO_SHADOW shadow pairs. The
# services take them at start: on a stack already up, `make down` first.
DEMO_WINDOW ?= 10
DEMO_PASSES ?= 1
DEMO_SHADOW ?= 8
demo: setup
	KS_MONITOR_WINDOW=$(DEMO_WINDOW) KS_TRAINER_KNOWLEDGE_MAX_DOCUMENTS=$$((2 * $(DEMO_WINDOW))) \
		KS_TRAINER_KNOWLEDGE_PASSES=$(DEMO_PASSES) KS_TRAINER_SHADOW_SAMPLES=$(DEMO_SHADOW) \
		$(MAKE) up
	$(PY) -m services.cli.demo --data $(LABELLED) --out .run/demo-drift.png

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

test-unit: setup
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

test-integration: setup
	$(PY) -m pytest tests/integration $(PYTEST_ARGS)

lint: setup lint-k8s
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# Renders every Kubernetes overlay (kubectl kustomize) and validates it offline against the
# Kubernetes schemas and the code's settings and topics; checks docker-compose.yml too.
.PHONY: lint-k8s
lint-k8s: setup
	$(PY) -m deploy.k8s.validate

fmt: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# README.md's settings tables, from each field's Field(description=...) (deploy/settings_doc.py).
docs: setup
	$(PY) -m deploy.settings_doc

bench: setup
	$(PY) -m bench.retrieval --data ../shared/data/pubmedqa/labeled.json --json
	$(PY) -m bench.freshness --json
	$(PY) -m bench.search --json
	$(PY) -m bench.serving --json
	$(PY) -m bench.drift --json
	$(PY) -m bench.training --json
	$(PY) -m bench.learning --json

# alibi-detect (the drift benchmark's comparison) pins transformers<5: its own venv, with torch
# from the same local CPU wheel.
ANCHORS := bench/.venv-anchors
bench-anchors: $(ANCHORS)/.installed

$(ANCHORS)/.installed:
	test -x $(ANCHORS)/bin/python || $(PYTHON) -m venv $(ANCHORS)
	$(ANCHORS)/bin/pip install -q "torch==2.13.0"
	$(ANCHORS)/bin/pip install -q "alibi-detect[torch]==0.13.0" "numpy<2"
	touch $@

# Derived files only: the stack's data (Redis, adapters, trainer jobs) goes with `make clean-data`.
clean:
	rm -rf $(GEN) .run/logs .run/triton .pytest_cache .mypy_cache .ruff_cache
