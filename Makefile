VENV ?= .venv
PY := $(VENV)/bin/python
# Keep the suite inside CI's budget on 2 cores; per-test timeouts catch hangs early.
PYTEST_ARGS ?= -q --timeout=600 -p no:cacheprovider

.PHONY: install test demo clean

install:
	VENV=$(VENV) EXTRAS=test bash scripts/bootstrap.sh

# DUALRPO_REQUIRE_EXT=1: here the C++ kernel must have been built, so a silent fall back to the
# pure-torch path fails the suite instead of passing it.
test: install
	DUALRPO_REQUIRE_EXT=1 $(PY) -m pytest $(PYTEST_ARGS) tests

# The tiny CPU DualRPO run end to end (data, SFT warm start, RL at TP=2 on 2 processes, held-out
# accuracy before/after, plots, HF export). DEMO_ARGS="--reward-mode grpo" runs GRPO instead.
DEMO_ARGS ?=
demo: install
	$(PY) -m dualrpo_mcore demo --out outputs/demo $(DEMO_ARGS)

clean:
	rm -rf build *.egg-info .pytest_cache
