# `make run`: set up everything and start the bot with embedded defaults (embedded Redis, default policy).
# `make test`: set up everything and run the whole test suite (`make test TESTS=tests/test_g711.py`: some of it).
.PHONY: run test setup
TESTS ?=
setup:
	bash scripts/setup.sh
run: setup
	.venv/bin/bot serve
test: setup
	.venv/bin/python -m pytest -q -rs $(TESTS)
