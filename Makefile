# The two commands of the README. Each bootstraps itself on a fresh Debian machine.
.PHONY: demo demo-secure test test-fast test-arm64 bench clean

demo:
	@scripts/demo.sh

# The same federation under secure aggregation: the coordinator learns only the weighted sum.
demo-secure:
	@scripts/demo.sh --secure

test:
	@scripts/test.sh

test-fast:
	@scripts/test.sh -m "not slow"

# The agent as aarch64 code under qemu (an emulated Raspberry Pi OS user space; CI runs it too).
test-arm64:
	@scripts/test.sh --arm64 tests/integration/test_arm64.py

clean:
	rm -rf .venv .pytest_cache build *.egg-info
