# Two commands for a fresh machine (see README):
#   make workbook   create .venv, install, execute every notebook headless into build/
#   make test       create .venv, install, unit tests + notebook lint + nbval over notebooks/
PYTHON ?= python3
VENV ?= .venv
PROFILE ?= default
TORCH_SPEC ?= torch==2.13.0
# Every other package is pinned by constraints.txt (the versions the committed notebook outputs were made
# with); `make lock` re-resolves the newest versions and rewrites it.
CONSTRAINTS ?= constraints.txt
# Extra pip arguments for the torch install, e.g. an --index-url of PyTorch's CPU-only wheels on a
# machine without a local CPU wheel (otherwise pip may pick a multi-GB CUDA build).
TORCH_PIP_ARGS ?=
BIN := $(VENV)/bin
STAMP := $(VENV)/.survey_lib-installed
export SURVEY_LIB_PROGRESS ?= 0

.PHONY: workbook test install browser refresh check clean lock

install: $(STAMP)

# torch (CPU wheel) goes in first, so nothing later pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -c $(CONSTRAINTS) -e ".[test]"
	touch $@

workbook: $(STAMP)
	$(BIN)/survey-lib run --profile $(PROFILE) --output build

# Unit tests and notebooks in two pytest processes: kernels started by the process that had run every unit test
# were measured 2.4x slower (notebook 10's sweep cell: 381 s after the unit tests in one process, 159 s alone).
# A third process opens the site built from the committed notebooks in headless Chromium (marker browser), after
# the notebooks, so that the leaderboard reads the benchmark store notebook 08 filled. All three always run; make
# fails if any failed. JUNIT_DIR (optional) receives a JUnit report of each (CI prints where the time went from them).
test: $(STAMP) browser
	$(BIN)/survey-lib check
	rc=0; \
	$(BIN)/python -m pytest tests -m "not browser" -p no:cacheprovider --durations=15 $(if $(JUNIT_DIR),--junitxml=$(JUNIT_DIR)/unit.xml) || rc=$$?; \
	$(BIN)/python -m pytest notebooks --nbval-lax --nbval-current-env -p no:cacheprovider --durations=15 $(if $(JUNIT_DIR),--junitxml=$(JUNIT_DIR)/notebooks.xml) || rc=$$?; \
	$(BIN)/python -m pytest tests/test_site.py -m browser -p no:cacheprovider --durations=5 $(if $(JUNIT_DIR),--junitxml=$(JUNIT_DIR)/site.xml) || rc=$$?; \
	exit $$rc

# Headless Chromium for the browser test: Debian's package where it is missing and installable (root with
# apt-get). Elsewhere (e.g. a Mac) the browser test skips, naming why, unless SURVEY_LIB_REQUIRE_BROWSER=1 (CI).
# Never fails: the browser test reports what is missing.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing Debian's chromium for the browser test"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null || echo "apt-get could not install chromium"; \
	  else echo "chromium is not on PATH and cannot be installed here (needs root and apt-get): the browser test will skip"; fi; }

# Maintainers: re-execute notebooks in the default profile and store normalized outputs.
refresh: $(STAMP)
	$(BIN)/survey-lib refresh

# Maintainers: resolve the newest versions in a scratch venv and pin them in constraints.txt
# (torch stays pinned by TORCH_SPEC). Re-run `make refresh` afterwards so the outputs match the pins.
lock:
	rm -rf build/lock-venv
	$(PYTHON) -m venv build/lock-venv
	build/lock-venv/bin/python -m pip install --quiet --upgrade pip
	build/lock-venv/bin/python -m pip install --quiet $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	build/lock-venv/bin/python -m pip install --quiet -e ".[test]"
	{ echo "# Pinned versions for make install (made by make lock with $$(build/lock-venv/bin/python --version))."; \
	  build/lock-venv/bin/python -m pip freeze --exclude-editable | grep -v -i '^torch=='; } > $(CONSTRAINTS).tmp
	mv $(CONSTRAINTS).tmp $(CONSTRAINTS)
	rm -rf build/lock-venv

clean:
	rm -rf build
