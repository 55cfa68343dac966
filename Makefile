# `make run`: set up everything and start the bot with embedded defaults (embedded Redis, default policy).
# `make test`: set up everything and run the whole test suite.
.PHONY: run test setup
setup:
	bash scripts/setup.sh
run: setup
	.venv/bin/bot serve
test: setup
	.venv/bin/python -m pytest -q -rs
