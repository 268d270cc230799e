# course-signup: `make run` starts the whole mesh locally, `make test` runs every test.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
NODE_INSTALLED := node_modules/.installed
GENERATED := gen/.generated
PROTO_SOURCES := $(shell find protos -name '*.proto')

.PHONY: all install gen run test test-unit lint lint-protos bench chaos clean

all: gen

$(INSTALLED): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	printf '%s\n%s\n' "$(CURDIR)" "$(CURDIR)/gen" > "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/course_signup.pth"
	touch $@

$(NODE_INSTALLED): package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

install: $(INSTALLED) $(NODE_INSTALLED)

$(GENERATED): $(INSTALLED) $(PROTO_SOURCES) scripts/gen_protos.py
	$(PY) scripts/gen_protos.py
	touch $@

gen: $(GENERATED)

## run: the whole mesh on embedded defaults (kinesalite, SQLite, aiosmtpd), data under var/
run: install gen
	@mkdir -p var
	@test -s var/admin-token || (umask 077 && $(PY) -c 'import secrets; print(secrets.token_urlsafe(32))' > var/admin-token)
	@test -s var/secrets.env || (umask 077 && $(PY) -m dev.secrets > var/secrets.env)
	ADMIN_TOKENS="$${ADMIN_TOKENS:-$$(cat var/admin-token)}" PATH="$(CURDIR)/$(VENV)/bin:$$PATH" \
		exec $(VENV)/bin/honcho -f Procfile -e dev/local.env,var/secrets.env start

## lint: ruff and mypy over the hand-written code (configured in pyproject.toml)
lint: install gen
	$(VENV)/bin/ruff check libs services tests dev scripts coursesignup_cli
	$(VENV)/bin/mypy

lint-protos: $(NODE_INSTALLED)
	cd protos && ../node_modules/.bin/buf lint
	@# An incompatible change to the API (a field renumbered, a type changed, a method
	@# removed) against the previous commit fails here (buf's FILE rules).
	@if git rev-parse -q --verify HEAD~1 >/dev/null; then \
		cd protos && ../node_modules/.bin/buf breaking --against '../.git#ref=HEAD~1,subdir=protos'; \
	else echo "buf breaking: no previous commit to compare with"; fi

## test: proto lint, then unit, integration (SQLite and PostgreSQL) and end-to-end tests
test: install gen lint-protos
	$(PY) -m pytest $(PYTEST_ARGS)

test-unit: install gen
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

## chaos: the fault test at a larger size (PostgreSQL, 3 enrollment workers killed under load)
CHAOS_REGISTRATIONS ?= 100000
chaos: install gen
	CHAOS_REGISTRATIONS=$(CHAOS_REGISTRATIONS) $(PY) -m pytest tests/e2e/test_enrollment_faults.py -k chaos -s $(PYTEST_ARGS)

## bench: speed figures, each against a baseline measured in the same run (BENCH=name for one)
bench: install gen
	$(PY) -m benchmarks $(BENCH)

clean:
	rm -rf gen $(VENV) node_modules
