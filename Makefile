# The two commands of the README. Both create .venv on first use and are idempotent.
SHELL := /bin/bash
export PATH := $(CURDIR)/.venv/bin:$(PATH)
export DVC_NO_ANALYTICS := 1

.PHONY: repro repro-real test env
env:
	@scripts/setup_env.sh

repro: env
	@scripts/repro.sh

# The real-image pipeline (CamVid, Flickr8k; real/dvc.yaml, docs/real.md): <= 60 min on 2 cores.
repro-real: env
	@dvc repro real/dvc.yaml
	@cat outputs/real_fusioner/table.md

test: env
	@scripts/test.sh
