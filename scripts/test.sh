#!/usr/bin/env bash
# The test command (`make test`): the whole suite, bounded. pytest exit 5 (no tests collected) fails loudly.
set -uo pipefail
cd "$(dirname "$0")/.."
timeout --signal=TERM --kill-after=30 3000 .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
rc=$?
if [ "$rc" -eq 5 ]; then echo "pytest collected no tests: treat as failure"; exit 1; fi
exit "$rc"
