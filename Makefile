# The two commands of the README. Both create .venv on first use and are idempotent.
SHELL := /bin/bash
export PATH := $(CURDIR)/.venv/bin:$(PATH)
export DVC_NO_ANALYTICS := 1

.PHONY: repro test env
env:
	@scripts/setup_env.sh

repro: env
	@scripts/repro.sh

test: env
	@scripts/test.sh
