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

.PHONY: setup system-deps demo test bench bench-setup clean

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

test: setup
	$(XVFB) $(PY) -m pytest -p no:cacheprovider

$(VENV)/.bench: $(VENV)/.installed
	$(PIP) install -q -e '.[testing,bench]' $(TORCH)
	touch $@

bench-setup: setup $(VENV)/.bench

bench: bench-setup
	$(XVFB) $(PY) -m benchmarks.run

clean:
	rm -rf $(VENV) demo-output .pytest_cache
