# edge-recorder: `make demo` runs the tour, `make test` runs the whole suite.
# Both install what they need (Debian packages, a virtualenv) on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Spoken prompts built from firmware/data/prompts.toml with espeak-ng (firmware/prompts.py).
PROMPTS := firmware/data/prompts
PROMPTS_STAMP := $(PROMPTS)/.built
BUILD_PROMPTS = $(BIN)/python -m firmware.promptbuild build $(PROMPTS) && touch $(PROMPTS_STAMP)
APT_PKGS := python3-venv python3-dev gcc age sox espeak-ng multimon-ng minimodem mosquitto libasound2-dev systemd sqlite3 openssl

.PHONY: demo test lint bench pki prompts sysdeps venv clean

demo: $(STAMP) $(PROMPTS_STAMP)
	$(BIN)/edge-recorder demo

test: $(STAMP) $(PROMPTS_STAMP)
	$(BIN)/ruff check .
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python bench/run.py

# A test PKI for the MQTT broker: make pki DIR=/tmp/pki DEVICES="dev-a dev-b"
pki: $(STAMP)
	@[ -n "$(DIR)" ] && [ -n "$(DEVICES)" ] || { echo 'usage: make pki DIR=... DEVICES="id ..."' >&2; exit 2; }
	$(BIN)/python -m sync.pki $(DIR) $(addprefix --device ,$(DEVICES))

prompts: $(PROMPTS_STAMP)

$(PROMPTS_STAMP): firmware/data/prompts.toml firmware/prompts.py firmware/promptbuild.py | $(STAMP)
	$(BUILD_PROMPTS)

sysdeps:
	@missing=""; for p in $(APT_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

venv: $(STAMP)

$(STAMP): pyproject.toml | sysdeps
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	$(BUILD_PROMPTS)
	touch $(STAMP)

clean:
	rm -rf $(VENV) build *.egg-info demo-out bench/out
