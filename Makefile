# dicom-node: every target does its own set-up on a fresh Debian machine.
#   make run    install into .venv and start the node on the embedded default
#   make test   install test needs (Debian orthanc, orthanc-dicomweb, dcmtk, dicom3tools, openjph-tools,
#               chromium, systemd, util-linux when root), run ruff and mypy, then the whole suite
#   make bench  run the benchmarks under bench/ (one: make bench NAME=receive)

PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
CONFIG ?=

.PHONY: run test test-unit lint install system-deps bench clean install-service lock

$(STAMP): pyproject.toml constraints.txt
	@command -v $(PYTHON) >/dev/null || { echo "$(PYTHON) not found: install Python 3.11"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first, pinned: a plain 'torch' would pull the CUDA build's gigabytes of packages.
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/dicom-node serve $(if $(CONFIG),--config $(CONFIG))

# Real PACS, modality and validator used by the integration tests.
system-deps:
	@if command -v Orthanc >/dev/null && command -v storescu >/dev/null && command -v dciodvfy >/dev/null && command -v ojph_compress >/dev/null && command -v chromium >/dev/null && command -v systemd-analyze >/dev/null && command -v setpriv >/dev/null && [ -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so ]; then \
	  echo "system test tools present (Orthanc, DCMTK, dciodvfy, OpenJPH, Chromium, systemd-analyze, Orthanc DICOMweb)"; \
	elif [ "$$(id -u)" = 0 ]; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq orthanc orthanc-dicomweb dcmtk dicom3tools openjph-tools chromium systemd util-linux; \
	else \
	  echo "not root: install the Debian packages orthanc orthanc-dicomweb dcmtk dicom3tools openjph-tools chromium systemd util-linux yourself"; \
	fi

test: $(STAMP) system-deps lint
	$(BIN)/python -m pytest

# Static checks, part of make test: ruff (a small rule set, pyproject.toml) and mypy (disallow_untyped_defs).
lint: $(STAMP)
	$(BIN)/ruff check dicom_node inference tests bench
	$(BIN)/mypy dicom_node inference

# Pin the versions now installed (after a deliberate upgrade) as the suite's and the product's.
lock: $(STAMP)
	{ sed -n '1,3p' constraints.txt; $(BIN)/python -m pip freeze --exclude-editable | sed 's/^torch==\([0-9.]*\)+.*/torch==\1/'; } > constraints.txt.new
	mv constraints.txt.new constraints.txt

test-unit: $(STAMP)
	$(BIN)/python -m pytest tests/unit

bench: $(STAMP) system-deps
	$(BIN)/python -m bench $(NAME) $(ARGS)

# The systemd service (as root, from a clone in PREFIX): user, unit, example configuration.
PREFIX ?= /opt/dicom-node
install-service: $(STAMP)
	@[ "$$(id -u)" = 0 ] || { echo "install-service needs root"; exit 1; }
	@[ "$$(realpath .)" = "$$(realpath $(PREFIX))" ] || { echo "clone into $(PREFIX) first (or make install-service PREFIX=$$(pwd))"; exit 1; }
	install -D -m 0644 systemd/dicom-node.sysusers.conf /usr/lib/sysusers.d/dicom-node.conf
	systemd-sysusers /usr/lib/sysusers.d/dicom-node.conf
	sed 's#/opt/dicom-node#$(PREFIX)#g' systemd/dicom-node.service > /etc/systemd/system/dicom-node.service
	install -d -m 0750 -g dicom-node /etc/dicom-node
	[ -e /etc/dicom-node/node.yaml ] || install -m 0640 -g dicom-node config/node.example.yaml /etc/dicom-node/node.yaml
	systemd-analyze verify /etc/systemd/system/dicom-node.service
	systemctl daemon-reload
	@echo "edit /etc/dicom-node/node.yaml (storage.path: /var/lib/dicom-node), then: systemctl enable --now dicom-node"

clean:
	rm -rf $(VENV) var .pytest_cache
