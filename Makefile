# dicom-node: every target does its own set-up on a fresh Debian machine.
#   make run    install into .venv and start the node on the embedded default
#   make test   install test needs (Debian orthanc, orthanc-dicomweb, dcmtk, dicom3tools, openjph-tools,
#               chromium, poppler-utils, npm, systemd, util-linux when root; the prebuilt OHIF viewer from
#               npm) and the optional Ray extra, run ruff and mypy, then the whole suite
#   make bench  run the benchmarks under bench/ (one: make bench NAME=receive)

PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
RAY    := $(VENV)/.ray-installed
CONFIG ?=
# The OHIF viewer the tests open results in (npm's @ohif/app ships it prebuilt in dist/).
OHIF_VERSION := 3.13.2
OHIF   := .cache/ohif-$(OHIF_VERSION)

.PHONY: run test test-unit lint install system-deps ohif bench clean install-service lock gpu-wheels

$(STAMP): pyproject.toml constraints.txt
	@command -v $(PYTHON) >/dev/null || { echo "$(PYTHON) not found: install Python 3.11"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first, pinned: a plain 'torch' would pull the CUDA build's gigabytes of packages.
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# The optional Ray extra (workers.engine: ray); the tests run a local Ray cluster.
$(RAY): $(STAMP)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test,ray]'
	touch $(RAY)

run: $(STAMP)
	$(BIN)/dicom-node serve $(if $(CONFIG),--config $(CONFIG))

# Real PACS, modality and validator used by the integration tests.
system-deps:
	@if command -v Orthanc >/dev/null && command -v storescu >/dev/null && command -v dciodvfy >/dev/null && command -v ojph_compress >/dev/null && command -v chromium >/dev/null && command -v pdftoppm >/dev/null && command -v npm >/dev/null && command -v systemd-analyze >/dev/null && command -v setpriv >/dev/null && [ -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so ]; then \
	  echo "system test tools present (Orthanc, DCMTK, dciodvfy, OpenJPH, Chromium, poppler, npm, systemd-analyze, Orthanc DICOMweb)"; \
	elif [ "$$(id -u)" = 0 ]; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq orthanc orthanc-dicomweb dcmtk dicom3tools openjph-tools chromium poppler-utils systemd util-linux $$(command -v npm >/dev/null || echo npm); \
	else \
	  echo "not root: install the Debian packages orthanc orthanc-dicomweb dcmtk dicom3tools openjph-tools chromium poppler-utils npm systemd util-linux yourself"; \
	fi

# The prebuilt OHIF viewer (only the package's dist/, unpacked under .cache; no node_modules).
$(OHIF)/dist/index.html:
	@command -v npm >/dev/null || { echo "npm not found: install the Debian package npm (make system-deps as root)"; exit 1; }
	rm -rf $(OHIF) && mkdir -p $(OHIF)
	cd $(OHIF) && npm pack --silent @ohif/app@$(OHIF_VERSION) >/dev/null && tar xzf ohif-app-$(OHIF_VERSION).tgz package/dist && mv package/dist dist && rm -rf package ohif-app-$(OHIF_VERSION).tgz

ohif: $(OHIF)/dist/index.html

# The suite runs in TEST_WORKERS processes (pytest-xdist), a test file per process at a time: a module's
# fixtures (a Ray cluster, nnU-Net's environment) are built once. Most tests wait on other processes
# (a node, Orthanc, storescu) on one core; two of them use a 2-core machine.
TEST_WORKERS ?= 2
test: $(STAMP) $(RAY) system-deps ohif lint
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile --durations=20

# Static checks, part of make test: ruff (a small rule set, pyproject.toml) and mypy (disallow_untyped_defs).
lint: $(STAMP) $(RAY)
	$(BIN)/ruff check dicom_node inference tests bench
	$(BIN)/mypy dicom_node inference

# Pin the versions now installed (after a deliberate upgrade) as the suite's and the product's.
lock: $(STAMP)
	{ sed -n '1,3p' constraints.txt; $(BIN)/python -m pip freeze --exclude-editable | sed 's/^torch==\([0-9.]*\)+.*/torch==\1/'; } > constraints.txt.new
	mv constraints.txt.new constraints.txt

test-unit: $(STAMP)
	$(BIN)/python -m pytest tests/unit

bench: $(STAMP) $(RAY) system-deps
	$(BIN)/python -m bench $(NAME) $(ARGS)

# Wheels for bench/gpu_check.sh on a GPU machine without a package index whose Python 3.12 has CUDA torch,
# numpy, scipy, scikit-image, pillow, PyYAML and pytest (a lent benchmark machine): the node's other
# dependencies at this project's pins (constraints.txt), for CPython 3.12 on x86-64 Linux, into .whl/.
GPU_PYTHON ?= 3.12
GPU_WHEELS := monai nibabel pydicom pynetdicom highdicom pyjpegls APScheduler tzlocal pydantic pydantic_core \
              annotated-types typing-inspection dicomweb-client retrying prometheus_client
gpu-wheels: $(STAMP)
	rm -rf .whl && mkdir -p .whl
	for name in $(GPU_WHEELS); do \
	  pin=$$(grep -i -m1 "^$$name==" constraints.txt) || { echo "$$name is not pinned in constraints.txt"; exit 1; }; \
	  $(BIN)/python -m pip download --quiet --no-deps --only-binary=:all: --python-version $(GPU_PYTHON) --implementation cp \
	    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	    --platform any -d .whl "$$pin" || exit 1; \
	done
	@du -sh .whl

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
