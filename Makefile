# Set-up is part of every target: a fresh machine needs only Python 3.11.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/gigafactory demo

# The chat page's browser test drives Debian's Chromium (Playwright's own browser download is never used).
CHROMIUM := /usr/bin/chromium

$(CHROMIUM):
	command -v apt-get >/dev/null && (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium) \
		|| echo "warning: cannot install chromium here; the browser test will fail" >&2

test: $(STAMP) $(CHROMIUM)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) runs
