#!/usr/bin/env bash
# Set up everything the test suite needs, then run it with no network but loopback.
# Extra arguments go to pytest.
#
# pytest runs in a network namespace of its own (unshare -n) with only `lo`, brought up
# here: no test, subprocess, browser or server it starts can reach beyond 127.0.0.1,
# whatever library it uses. TOKENRELAY_TEST_NETNS=off runs it in the host's network
# instead (a machine without namespaces; the suite's own socket guard still applies).
set -euo pipefail
cd "$(dirname "$0")/.."

# System packages: Debian's Chromium (headless browser test of the chat page; Playwright
# never downloads a browser here), redis-server (the Redis stream store; the tests start
# their own on a free port), nginx (the load balancer of the replica tests, run by them
# with deploy/nginx.conf on a free port), iproute2 (`ip`, to bring up loopback in the
# namespace).
missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
{ command -v nginx || [ -x /usr/sbin/nginx ]; } >/dev/null 2>&1 || missing+=(nginx)
command -v ip >/dev/null 2>&1 || missing+=(iproute2)
command -v unshare >/dev/null 2>&1 || missing+=(util-linux)
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
        echo "tokenrelay test: installing ${missing[*]} (apt)..." >&2
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}") >/dev/null
    else
        echo "tokenrelay test: missing ${missing[*]} (install them as root: apt-get install -y ${missing[*]})" >&2
    fi
fi

scripts/setup.sh local,server,llama-server,redis,test
# Tests never touch the network beyond loopback.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 NO_PROXY="127.0.0.1,localhost"
unset OPENAI_API_KEY OPENAI_BASE_URL TOKENRELAY_MODEL TOKENRELAY_LOG || true
# This is CI: a skip fails unless its reason cannot apply to this machine (conftest.py).
export TOKENRELAY_STRICT_SKIPS="${TOKENRELAY_STRICT_SKIPS:-1}"

if [ "${TOKENRELAY_TEST_NETNS:-on}" = "off" ]; then
    exec .venv/bin/python -m pytest "$@"
fi
# Root needs no user namespace; anyone else maps themselves to root in one (-r).
userns=(-r)
[ "$(id -u)" = "0" ] && userns=()
export TOKENRELAY_TEST_NETNS=on
exec unshare "${userns[@]}" -n -- sh -c 'ip link set lo up && exec "$@"' sh \
    .venv/bin/python -m pytest "$@"
