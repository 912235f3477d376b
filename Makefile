# napari-magnet: `make demo`, `make test`, `make bench`.
# Every target sets up what it needs: Debian packages for Xvfb/Mesa/Qt (when root and missing),
# then a .venv with torch, torchvision and the package installed editable.

SHELL := /bin/bash
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
XVFB := xvfb-run -a -s "-screen 0 1600x1200x24"
TORCH := torch==2.14.1 torchvision==0.29.1
APT_PACKAGES := xvfb xauth libgl1-mesa-dri libglx-mesa0 libegl1 libxkbcommon-x11-0 \
	libxcb-icccm4 libxcb-image0 libxcb-keysyms1 libxcb-randr0 libxcb-render-util0 \
	libxcb-xinerama0 libxcb-xfixes0 libxcb-shape0 libxcb-cursor0 libdbus-1-3 libfontconfig1

.PHONY: setup system-deps demo test lint format bench bench-setup clean demo-model bench-learn zoommil-demo-model

system-deps:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ]; then \
			echo "Installing Debian packages: $$missing"; \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
		else \
			echo "Missing Debian packages (run as root or install them): $$missing"; exit 1; \
		fi; \
	fi

$(VENV)/.torch:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH)
	touch $@

$(VENV)/.installed: pyproject.toml $(VENV)/.torch
	$(PIP) install -q -e '.[testing]' $(TORCH)
	touch $@

setup: system-deps $(VENV)/.installed

demo: setup
	$(VENV)/bin/napari-magnet demo

# The dask.distributed tests run in processes of their own: a LocalCluster leaves state in the
# process that started it which changes later float results (being investigated).
DASK_TESTS := tests/engine/test_cohort_run.py tests/test_cli_batch.py

test: setup
	$(XVFB) $(PY) -m pytest -p no:cacheprovider $(addprefix --ignore=,$(DASK_TESTS))
	$(PY) -m pytest -p no:cacheprovider tests/engine/test_cohort_run.py
	$(PY) -m pytest -p no:cacheprovider tests/test_cli_batch.py

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

format: setup
	$(VENV)/bin/ruff check --fix src tests benchmarks
	$(VENV)/bin/ruff format src tests benchmarks

$(VENV)/.bench: $(VENV)/.installed
	$(PIP) install -q -e '.[testing,bench]' $(TORCH)
	touch $@

bench-setup: setup $(VENV)/.bench

bench: bench-setup
	$(XVFB) $(PY) -m benchmarks.run

clean:
	rm -rf $(VENV) demo-output .pytest_cache

# --- learning: the shipped demo model and the learning benchmark --------------------------
# Synthetic cohorts (fixed seeds; keep in sync with benchmarks/bench_learn.py), 8192 x 8192
# px at 0.5 µm/px (4.1 mm: room for macro lesions): 400 training slides whose positives are
# two-thirds micro (the hard class), and 150 held-out ones with micro, macro and ITC.
LEARN_DIR ?= benchmarks/_data/learn
LEARN_SLIDES := --width 8192 --height 8192 --mpp 0.5 --jobs $(shell nproc) --quiet
DEMO_RUN := $(LEARN_DIR)/runs/demo
DEMO_EPOCHS ?= 13
DEMO_DEVICE ?= auto
DEMO_WEIGHTS := src/napari_magnet/weights/demo

$(LEARN_DIR)/train/cohort.csv:
	$(VENV)/bin/napari-magnet synth --out $(LEARN_DIR)/train --n 400 --seed 11 \
		--positives micro,micro,macro $(LEARN_SLIDES)

$(LEARN_DIR)/test/cohort.csv:
	$(VENV)/bin/napari-magnet synth --out $(LEARN_DIR)/test --n 150 --seed 21 \
		--positives micro,micro,macro,itc $(LEARN_SLIDES)

# magnet3-lite on the training cohort, ITC excluded (the paper's protocol), 15% held out for
# validation; the best validation epoch is shipped. Made for a GPU (about 4 minutes on an
# H100 with 16 cores; DEMO_DEVICE=auto picks CUDA when present); on a small CPU-only machine
# it takes hours. An
# interrupted run resumes where it stopped.
demo-model: setup $(LEARN_DIR)/train/cohort.csv $(LEARN_DIR)/test/cohort.csv
	$(VENV)/bin/napari-magnet train --slides $(LEARN_DIR)/train/cohort.csv \
		$(if $(wildcard $(DEMO_RUN)/train_state.json),--resume $(DEMO_RUN),--model magnet3-lite) \
		--epochs $(DEMO_EPOCHS) --batch-size 16 --lr 1e-3 --val-fraction 0.15 \
		--device $(DEMO_DEVICE) --workers 4 --seed 0 --exclude-classes itc --out $(DEMO_RUN)
	$(PY) -c "from napari_magnet.engine.training import export_model; \
		export_model('$(DEMO_RUN)/best', '$(DEMO_WEIGHTS)', \
		notes='Demo model: magnet3-lite trained on synthetic slides only (make demo-model). Not for diagnosis.', \
		extra={'cohort': 'napari-magnet synth --n 400 --seed 11 --positives micro,micro,macro --width 8192 --height 8192 --mpp 0.5'})"
	$(VENV)/bin/napari-magnet evaluate --slides $(LEARN_DIR)/test/cohort.csv --model demo \
		--device $(DEMO_DEVICE) --out $(LEARN_DIR)/demo-eval.md

# ZoomMIL on the training cohort's bags (8, 4, 1 µm/px; the shipped napari-small encoder),
# best validation epoch shipped as zoommil-demo. Resumes; about an hour on a 2-core CPU.
zoommil-demo-model: setup
	$(PY) -m benchmarks.bench_zoommil

# Held-out comparison of magnet3-lite (the demo model), ats and the mean-RGB baseline, then
# ZoomMIL vs ABMIL vs magnet3-lite (benchmarks/bench_zoommil.py),
# written to benchmarks/results/learn.md and benchmarks/RESULTS.md.
bench-learn: setup
	$(PY) -m benchmarks.run learn zoommil
