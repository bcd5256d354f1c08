# The two commands of the README. Each bootstraps itself on a fresh Debian machine.
.PHONY: demo test test-fast bench clean

demo:
	@scripts/demo.sh

test:
	@scripts/test.sh

test-fast:
	@scripts/test.sh -m "not slow"

clean:
	rm -rf .venv .pytest_cache build *.egg-info
