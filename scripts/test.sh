#!/usr/bin/env bash
# Set up everything the test suite needs, then run it. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

# System packages: tmux (interactive CLI tests in a real terminal), Debian's Chromium
# (headless browser test of the chat page; Playwright never downloads a browser here) and
# redis-server (the Redis stream store; the tests start their own on a free port).
missing=()
command -v tmux >/dev/null 2>&1 || missing+=(tmux)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
        echo "tokenrelay test: installing ${missing[*]} (apt)..." >&2
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}") >/dev/null
    else
        echo "tokenrelay test: missing ${missing[*]}; the tests needing them will skip" >&2
    fi
fi

scripts/setup.sh local,server,llama-server,redis,test
# Tests never touch the network beyond loopback.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 NO_PROXY="127.0.0.1,localhost"
unset OPENAI_API_KEY OPENAI_BASE_URL TOKENRELAY_MODEL TOKENRELAY_LOG || true
exec .venv/bin/python -m pytest "$@"
