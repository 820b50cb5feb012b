# Every target sets up what it needs: the virtualenv, the Python packages and the Debian tools.
PYTHON  ?= python3
VENV    := .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed-stamp
SYSDEPS := mosquitto=mosquitto age=age ffprobe=ffmpeg minisign=minisign node=nodejs npm=npm \
           chromium=chromium chromedriver=chromium-driver turnserver=coturn espeak-ng=espeak-ng \
           sox=sox
INTEROP := tests/interop

.DEFAULT_GOAL := help
.PHONY: help sim test bench soak fuzz lint flash sysdeps venv interop clean

help: ## Show this help
	@echo "SOS devices: firmware, simulator and control centre"
	@echo
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

sim: venv sysdeps ## Simulate an ambulance shift (call, SOS, live view, upload) and a pillar SOS answered by voice; prints the operator console's URL and log-in (sos-sim run shift --console keeps it up)
	$(VENV)/bin/sos-sim run shift
	$(VENV)/bin/sos-sim run pillar-sos

test: venv sysdeps interop ## Run the test suite (real Mosquitto, real ptys, gpiozero mock pins, a Node.js partner centre, headless Chromium, aiortc voice calls through coturn)
	$(PY) -m pytest -q

bench: venv sysdeps ## Benchmarks: SOS latency, evidence writer, upload goodput, live-view latency, console (row visible, video playing), voice (press to connected, mouth-to-ear), sound recording
	$(PY) -m bench

soak: venv sysdeps ## Long soak and fuzz variants of the tests (slow)
	$(PY) -m pytest -q -m slow

fuzz: soak ## Alias of soak: the long randomised runs

flash: venv ## Provision a device (firmware wheel + the Pi's wheelhouse: installs offline): make flash ID=tok-001 PROFILE=token TARGET=/media/rootfs FLEET=dir BROKER=host:8883 [ARGS=...]
	@test -n "$(ID)" -a -n "$(PROFILE)" -a -n "$(TARGET)" -a -n "$(FLEET)" -a -n "$(BROKER)" || \
	  { echo "usage: make flash ID=... PROFILE=token|pillar TARGET=... FLEET=... BROKER=host:port [ARGS='--surveyed LAT,LON --wheelhouse DIR']  (docs/FLASHING.md)"; exit 2; }
	@test -d "$(TARGET)" || { echo "make flash: TARGET=$(TARGET): not an existing directory (mount the SD card's root filesystem there first)" >&2; exit 2; }
	$(VENV)/bin/sos-provision --id $(ID) --profile $(PROFILE) --target $(TARGET) \
	  --fleet $(FLEET) --broker $(BROKER) $(ARGS)

lint: venv ## ruff check
	$(VENV)/bin/ruff check .

sysdeps: ## Install the Debian tools the tests use when missing (mosquitto, age, ffmpeg, minisign, nodejs, npm, chromium, coturn, espeak-ng, sox)
	@scripts/ensure-system-deps $(SYSDEPS)

venv: $(STAMP) ## Create .venv and install the project with its dev tools

interop: $(INTEROP)/node_modules ## Install the Node.js interoperability test's npm packages (from its lock file)

# Again whenever the lock file is newer than the installed packages (npm ci starts afresh).
$(INTEROP)/node_modules: $(INTEROP)/package-lock.json | sysdeps
	npm ci --prefix $(INTEROP) --no-audit --no-fund --loglevel=error
	touch $@

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

clean: ## Remove the virtualenv, the interop test's npm packages and caches
	rm -rf $(VENV) $(INTEROP)/node_modules .pytest_cache .ruff_cache *.egg-info
