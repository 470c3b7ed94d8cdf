# dicom-node: every target does its own set-up on a fresh Debian machine.
#   make run    install into .venv and start the node on the embedded default
#   make test   install test needs (Debian orthanc, dcmtk, dicom3tools when root) and run the suite
#   make bench  run the benchmarks under bench/ (one: make bench NAME=receive)

PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
CONFIG ?=

.PHONY: run test test-unit install system-deps bench clean

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "$(PYTHON) not found: install Python 3.11"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first, pinned: a plain 'torch' would pull the CUDA build's gigabytes of packages.
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/dicom-node serve $(if $(CONFIG),--config $(CONFIG))

# Real PACS, modality and validator used by the integration tests.
system-deps:
	@if command -v Orthanc >/dev/null && command -v storescu >/dev/null && command -v dciodvfy >/dev/null; then \
	  echo "system test tools present (Orthanc, DCMTK, dciodvfy)"; \
	elif [ "$$(id -u)" = 0 ]; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq orthanc dcmtk dicom3tools; \
	else \
	  echo "not root: install the Debian packages orthanc dcmtk dicom3tools yourself"; \
	fi

test: $(STAMP) system-deps
	$(BIN)/python -m pytest

test-unit: $(STAMP)
	$(BIN)/python -m pytest tests/unit

bench: $(STAMP) system-deps
	$(BIN)/python -m bench $(NAME) $(ARGS)

clean:
	rm -rf $(VENV) var .pytest_cache
