#!/usr/bin/env bash
# Set up everything the test suite needs, then run it. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh local,server,llama-server,test
# Tests never touch the network beyond loopback.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 NO_PROXY="127.0.0.1,localhost"
unset OPENAI_API_KEY OPENAI_BASE_URL TOKENRELAY_MODEL TOKENRELAY_LOG || true
exec .venv/bin/python -m pytest "$@"
