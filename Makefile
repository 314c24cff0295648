# mqvox: `make demo` sets everything up and runs the loop; `make test` runs the suite.
# Every target that needs Python depends on the venv, so either command works on a fresh clone.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
RUN_DIR ?= .run
BROKER_PORT ?= 0
# Debian packages: the broker and its command-line clients, speech engines and voices for training and
# evaluation (espeak-ng, flite, festival with kal, ked and the held-out slt), PortAudio for microphones, and the
# PostgreSQL server whose binaries the tests start a throwaway server from (tests/throwaway_postgres.py).
APT_PACKAGES := mosquitto mosquitto-clients espeak-ng flite festival festvox-kallpc16k festvox-kdlpc16k \
	festvox-us-slt-hts libportaudio2 postgresql
# Node.js and npm for the Node-RED example (examples/node-red, tests/test_node_red.py): Debian's, unless an npm is
# already on PATH (NodeSource's nodejs package carries its own npm and conflicts with Debian's).
APT_PACKAGES += $(if $(shell command -v npm),,nodejs npm)
NODE_RED_DIR := examples/node-red
NODE_RED_INSTALLED := $(NODE_RED_DIR)/node_modules/.installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup system-packages voice-packages demo test test-fast bench bench-real-commands bench-real-voices bench-learning-loop train evaluate lint format broker broker-stop clean

setup: system-packages $(VENV)/.installed $(NODE_RED_INSTALLED)

system-packages:
	@missing=""; for p in $(APT_PACKAGES); do \
		dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		$(SUDO) apt-get update -q && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q $$missing; \
	fi

# Reinstalled when the dependency list changes. The device's pyrnnoise comes without its dependencies (the file says why).
NO_DEPS_REQUIREMENTS := firmware_tools/onboarding/deploy/requirements-no-deps.txt
# Test-only packages whose declared dependencies clash with mqvox's (the file says which and why).
TEST_NO_DEPS_REQUIREMENTS := tests/requirements-no-deps.txt
$(VENV)/.installed: pyproject.toml $(NO_DEPS_REQUIREMENTS) $(TEST_NO_DEPS_REQUIREMENTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[all]'
	$(PY) -m pip install -q --no-deps -r $(NO_DEPS_REQUIREMENTS)
	$(PY) -m pip install -q --no-deps -r $(TEST_NO_DEPS_REQUIREMENTS)
	touch $@

# Node-RED for the example flow, as pinned in its lock file: installed again when the lock changes.
$(NODE_RED_INSTALLED): $(NODE_RED_DIR)/package.json $(NODE_RED_DIR)/package-lock.json | system-packages
	npm ci --prefix $(NODE_RED_DIR) --no-audit --no-fund --loglevel=error
	touch $@

demo: setup
	$(PY) demo.py

# The whole suite: it starts its own Mosquitto and its own PostgreSQL (MQVOX_TEST_POSTGRES_URL names a server to
# use instead).
test: setup
	$(PY) -m pytest

# The edit loop: every test but the slow ones and those that run programs in subprocesses (tests/README.md).
test-fast: setup
	$(PY) -m pytest -m "not slow and not subprocess"

# The shipped model (device/models/default) from scratch: render, augment, features, train, quantize, the command
# head on the speech embedding (real speech: FSDD from a data directory, FSDD=DIR, and the training packages' voice
# lines, installed here when missing), package.
train: setup voice-packages
	@test -n "$(FSDD)" || { echo "usage: make train FSDD=DIR (the FSDD recordings)"; exit 2; }
	$(PY) -m firmware_tools train-all --recipe default --fsdd $(FSDD)

# Held-out evaluation of the shipped model against the peer wake word models; writes evaluation.json and plots.
evaluate: setup
	$(PY) -m firmware_tools evaluate --model device/models/default

bench: setup
	@for script in bench/*.py; do echo "== $$script"; $(PY) $$script || exit 1; done

# The cloud's real-command figures (bench/cloud.py --fsdd): FSDD from a data directory, FSDD=DIR, and real
# non-commands from Debian game and education packages, installed here when missing (about 2.5 GB).
VOICE_PACKAGES := hedgewars-data nexuiz-data openarena-data redeclipse-data klettres-data ktuberling-data \
	warzone2100-data asterisk-core-sounds-en-wav asterisk-core-sounds-en pocketsphinx-testdata codec2-examples

voice-packages:
	@missing=""; for p in $(VOICE_PACKAGES); do \
		dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
		$(SUDO) apt-get update -q && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q $$missing; \
	fi

bench-real-commands: setup voice-packages
	@test -n "$(FSDD)" || { echo "usage: make bench-real-commands FSDD=DIR (the FSDD recordings)"; exit 2; }
	$(PY) bench/cloud.py --fsdd $(FSDD)

# The device on real voices (bench/real_voices.py): FSDD speakers never trained on (the fold heads of make train),
# real non-commands, false wakes on the evaluation-only recordings, against microWakeWord and openWakeWord.
bench-real-voices: setup voice-packages
	@test -n "$(FSDD)" || { echo "usage: make bench-real-voices FSDD=DIR (the FSDD recordings)"; exit 2; }
	$(PY) bench/real_voices.py --fsdd $(FSDD)

# The fleet learning loop (bench/learning_loop.py): simulated devices spoken to by FSDD speakers the starting model
# never heard and the held-out synthetic voices; the worker labels, each round adapts, gates and rolls out.
bench-learning-loop: setup voice-packages
	@test -n "$(FSDD)" || { echo "usage: make bench-learning-loop FSDD=DIR (the FSDD recordings)"; exit 2; }
	$(PY) bench/learning_loop.py --fsdd $(FSDD)

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: setup
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

# A development broker from broker_config/, on BROKER_PORT (0 picks a free one), data in $(RUN_DIR)/broker.
broker: setup  # BIND=ADDRESS listens on the LAN (unauthenticated: see README "A Pi with a microphone")
	$(PY) -m broker_config start --port $(BROKER_PORT) --data-dir $(RUN_DIR)/broker $(if $(BIND),--bind $(BIND),)

broker-stop: setup
	$(PY) -m broker_config stop --data-dir $(RUN_DIR)/broker

clean:
	rm -rf $(RUN_DIR) .pytest_cache .ruff_cache build *.egg-info
