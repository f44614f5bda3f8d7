#!/usr/bin/env bash
# Installs the benchmark peers into two virtual environments OUTSIDE the repo:
#   $ZDYN_PEERS_DIR/dynamo-venv  NVIDIA Dynamo 1.6.1 (frontend, KV router, mocker engine), no torch
#   $ZDYN_PEERS_DIR/aiperf-venv  NVIDIA aiperf (OpenAI-compatible load generator)
# ZDYN_PEERS_DIR defaults to ~/.cache/zdyn/peers. Idempotent: a venv whose stamp matches is left alone.
# Only PyPI wheels are installed; nothing from Dynamo's source tree enters this repository.
#
# Every package is pinned to the versions this was verified with (the lock lists at the end of this file,
# taken with `pip freeze` on Python 3.11 x86-64); ZDYN_PEERS_UNPINNED=1 resolves the ranges afresh instead.
#
# Usage: benchmarks/peers/setup.sh [all|dynamo|aiperf]      (default: all)
# Env:   ZDYN_PEERS_DIR, ZDYN_PEERS_PYTHON (default python3), ZDYN_PEERS_FORCE=1 (rebuild the venvs),
#        ZDYN_PEERS_UNPINNED=1 (no lock lists)
set -euo pipefail

PEERS_DIR="${ZDYN_PEERS_DIR:-$HOME/.cache/zdyn/peers}"
PYTHON="${ZDYN_PEERS_PYTHON:-python3}"
FORCE="${ZDYN_PEERS_FORCE:-0}"
UNPINNED="${ZDYN_PEERS_UNPINNED:-0}"
WHAT="${1:-all}"

DYNAMO_VERSION="1.6.1"
AIPERF_VERSION="0.13.0"

# ai-dynamo 1.6.1 pins aisimulate==0.13.0, which on PyPI is a stub sdist that downloads from NVIDIA's own
# index and fails (metadata-generation-failed). So both Dynamo wheels go in with --no-deps and their real
# dependencies are listed here. aisimulate only backs the optional AI-Configurator timing models.
DYNAMO_PKGS=("ai-dynamo==${DYNAMO_VERSION}" "ai-dynamo-runtime==${DYNAMO_VERSION}")
DYNAMO_DEPS=(
    'pydantic>=2.10.6,<=2.13.5'
    'uvloop>=0.21.0'
    'aiohttp>=3.14.3,<4'
    'certifi>=2026.10.19'
    'kubernetes>=32.0.1,<33'
    'msgspec>=0.19.0'
    'prometheus-client>=0.23.1,<1'
    'pyzmq>=26'
    'redis>=6.2,<9'
    'tqdm>=4'
    'transformers>=4.56'
    'typing-extensions>=4.10'
    'zstandard>=0.23,<1'
    'tokenizers'
    'httpx'
)
AIPERF_PKGS=("aiperf==${AIPERF_VERSION}")

log() { printf '[peers] %s\n' "$*"; }

# venv_pip VENV ARGS... -- the venv's pip, minus the noise of this machine's global pip config (extra-index-url
# entries pointing at folders that hold only some packages warn once per package).
venv_pip() {
    local venv="$1"
    shift
    "$venv/bin/python" -m pip "$@" 2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2)
}

case "$WHAT" in
    all | dynamo | aiperf) ;;
    *)
        echo "usage: $0 [all|dynamo|aiperf]" >&2
        exit 2
        ;;
esac

mkdir -p "$PEERS_DIR"
PEERS_DIR="$(cd "$PEERS_DIR" && pwd)"  # absolute, since we cd there
# Work from the peers folder, and run checks with python -I (isolated: no current folder or PYTHONPATH on sys.path),
# so that `import dynamo` / `import aiperf` find the installed packages and nothing else.
cd "$PEERS_DIR"

# constraints_args VENV NAME -- prints "-c FILE" (writing FILE into the venv) unless ZDYN_PEERS_UNPINNED=1
constraints_args() {
    local venv="$1" name="$2"
    if [[ "$UNPINNED" == 1 ]]; then
        return 0
    fi
    "lock_$name" >"$venv/zdyn-peer-lock.txt"
    printf '%s\n' "-c" "$venv/zdyn-peer-lock.txt"
}

lock_id() {
    if [[ "$UNPINNED" == 1 ]]; then
        echo unpinned
    else
        "lock_$1" | sha256sum | cut -c1-12
    fi
}

# make_venv NAME STAMP CHECK_PY -- installs via the install_NAME function unless the stamp matches and
# CHECK_PY (a python snippet run by the venv's interpreter) succeeds.
make_venv() {
    local name="$1" stamp="$2" check="$3"
    local venv="$PEERS_DIR/$name"
    local stamp_file="$venv/.zdyn-peer-stamp"
    if [[ "$FORCE" != 1 && -f "$stamp_file" && "$(cat "$stamp_file")" == "$stamp" ]] &&
        "$venv/bin/python" -I -c "$check" >/dev/null 2>&1; then
        log "$name: already installed (${stamp%;deps=*}) at $venv, skipping"
        return 0
    fi
    if [[ -d "$venv" ]]; then
        log "$name: removing incomplete or outdated venv $venv"
        rm -rf "$venv"
    fi
    local t0=$SECONDS
    log "$name: creating venv at $venv with $("$PYTHON" --version 2>&1)"
    "$PYTHON" -m venv "$venv"
    venv_pip "$venv" install --quiet --upgrade pip
    "install_${name%-venv}" "$venv"
    "$venv/bin/python" -I -c "$check" 2>/dev/null || "$venv/bin/python" -I -c "$check"
    printf '%s' "$stamp" >"$stamp_file"
    log "$name: installed in $((SECONDS - t0)) s, $(du -sh "$venv" | cut -f1)"
}

install_dynamo() {
    local venv="$1"
    local -a lock
    mapfile -t lock < <(constraints_args "$venv" dynamo)
    log "dynamo-venv: pip install --no-deps ${DYNAMO_PKGS[*]}"
    venv_pip "$venv" install --quiet --no-deps "${lock[@]}" "${DYNAMO_PKGS[@]}"
    log "dynamo-venv: pip install the dependencies of ai-dynamo (without aisimulate;" \
        "pip's complaint that aisimulate is not installed is expected)"
    venv_pip "$venv" install --quiet "${lock[@]}" "${DYNAMO_DEPS[@]}"
}

install_aiperf() {
    local venv="$1"
    local -a lock
    mapfile -t lock < <(constraints_args "$venv" aiperf)
    log "aiperf-venv: pip install ${AIPERF_PKGS[*]}"
    venv_pip "$venv" install --quiet "${lock[@]}" "${AIPERF_PKGS[@]}"
}

DYNAMO_CHECK="
import importlib.metadata as md
assert md.version('ai-dynamo') == '${DYNAMO_VERSION}', md.version('ai-dynamo')
assert md.version('ai-dynamo-runtime') == '${DYNAMO_VERSION}', md.version('ai-dynamo-runtime')
import dynamo.llm, dynamo.runtime, transformers, uvloop  # noqa
"
AIPERF_CHECK="
import importlib.metadata as md
assert md.version('aiperf') == '${AIPERF_VERSION}', md.version('aiperf')
import aiperf  # noqa
"

main() {
    if [[ "$WHAT" == all || "$WHAT" == dynamo ]]; then
        local deps
        deps="$(printf '%s ' "${DYNAMO_DEPS[@]}")"
        make_venv dynamo-venv "ai-dynamo==${DYNAMO_VERSION};lock=$(lock_id dynamo);deps=${deps}" "$DYNAMO_CHECK"
    fi
    if [[ "$WHAT" == all || "$WHAT" == aiperf ]]; then
        make_venv aiperf-venv "aiperf==${AIPERF_VERSION};lock=$(lock_id aiperf)" "$AIPERF_CHECK"
    fi

    echo
    log "peers directory: $PEERS_DIR"
    if [[ -x "$PEERS_DIR/dynamo-venv/bin/python" ]]; then
        log "  Dynamo: $PEERS_DIR/dynamo-venv/bin/python -m dynamo.frontend | -m dynamo.mocker" \
            "(ai-dynamo $("$PEERS_DIR/dynamo-venv/bin/python" -I -c \
            "import importlib.metadata as m; print(m.version('ai-dynamo'))" 2>/dev/null || echo '?'))"
    fi
    if [[ -x "$PEERS_DIR/aiperf-venv/bin/aiperf" ]]; then
        log "  aiperf: $PEERS_DIR/aiperf-venv/bin/aiperf" \
            "($("$PEERS_DIR/aiperf-venv/bin/python" -I -c \
            "import importlib.metadata as m; print(m.version('aiperf'))" 2>/dev/null || echo '?'))"
    fi
    log "use: python -m zdyn.bench.dynamo_peer --help (from the repo root)"
}

# The lock lists (pip constraints): `pip freeze` of the verified venvs, minus pip/setuptools.
lock_dynamo() {
    cat <<'LOCK'
ai-dynamo==1.6.1
ai-dynamo-runtime==1.6.1
aiohappyeyeballs==2.7.1
aiohttp==3.14.5
aiosignal==1.4.0
annotated-doc==0.0.7
annotated-types==0.8.0
anyio==4.16.0
attrs==26.1.0
certifi==2026.10.19.post1
cffi==2.1.1
charset-normalizer==3.5.3
click==8.5.1
cryptography==50.0.2
durationpy==0.11
filelock==4.3.1
frozenlist==1.8.0
fsspec==2026.9.0
google-auth==2.63.0
h11==0.16.0
hf-xet==1.8.0
httpcore==1.0.9
httpcore2==2.16.2
httpx==0.28.1
httpx2==2.16.2
huggingface_hub==2.4.0
idna==3.20
kubernetes==32.0.1
markdown-it-py==4.3.0
mdurl==0.1.2
msgspec==0.22.0
multidict==7.2.1
numpy==2.4.6
oauthlib==4.0.1
packaging==26.4
prometheus_client==0.26.0
propcache==0.5.4
pyasn1==0.6.5
pyasn1_modules==0.4.2
pycparser==3.12
pydantic==2.13.5
pydantic_core==2.46.5
Pygments==2.21.0
python-dateutil==4.0.0
PyYAML==6.0.4
pyzmq==27.3.0
redis==8.1.0
regex==2026.11.19
requests==2.34.2
requests-oauthlib==2.0.0
rich==15.0.0
safetensors==0.8.0
shellingham==1.5.4
six==1.17.0
tokenizers==0.23.3
tqdm==4.70.1
transformers==5.24.0
truststore==0.10.5
typer==0.29.2
typing-inspection==0.4.5
typing_extensions==4.16.0
tzdata==2026.6
urllib3==2.8.0
uvloop==0.23.0
websocket-client==1.9.2
yarl==1.25.1
zstandard==0.25.0
LOCK
}
lock_aiperf() {
    cat <<'LOCK'
aiofiles==24.1.0
aiohappyeyeballs==2.7.1
aiohttp==3.14.5
aiosignal==1.4.0
aiosqlite==0.22.1
aiperf==0.13.0
alembic==1.20.1
annotated-doc==0.0.7
annotated-types==0.8.0
anyio==4.16.0
attrs==26.1.0
blinker==1.9.0
brotli==1.2.1
certifi==2026.10.19.post1
cffi==2.1.1
charset-normalizer==3.5.3
choreographer==1.4.0
click==8.5.1
colorlog==6.12.0
contourpy==1.3.3
crick==0.0.8
cycler==0.12.1
cyclopts==4.25.3
dash==3.1.1
dash-bootstrap-components==2.0.4
datasets==5.2.0
dill==0.4.1
docstring_parser==0.18.0
fastapi==0.165.0
ffmpeg-python==0.2.0
filelock==4.3.1
Flask==3.1.3
fonttools==4.68.0
frozenlist==1.8.0
fsspec==2026.9.0
future==1.0.0
h11==0.16.0
hf-xet==1.8.0
httpcore==1.0.9
httptools==0.9.0
httpx==0.28.1
huggingface_hub==1.33.0
idna==3.20
importlib_metadata==10.2.0
iniconfig==2.3.1
iso8601==2.1.0
itsdangerous==2.2.0
Jinja2==3.1.6
jmespath==1.0.1
jsonpatch==1.48
jsonpointer==3.12
kaleido==1.2.0
kiwisolver==1.5.1
kopf==1.45.2
kubernetes_asyncio==32.3.2
lazy-importer==0.1.0
linkify-it-py==2.2.0
logistro==2.0.1
Mako==1.4.3
markdown-it-py==4.3.0
MarkupSafe==3.0.4
matplotlib==3.11.2
mdit-py-plugins==0.7.0
mdurl==0.1.2
msgspec==0.22.0
multidict==7.2.1
multiprocess==0.70.19
narwhals==2.29.0
nest-asyncio==1.6.0
numpy==2.4.6
nvidia-ml-py==13.615.71
opentelemetry-api==1.45.2
optuna==5.0.0
orjson==3.11.9
packaging==26.4
pandas==2.3.3
pillow==12.3.0
platformdirs==4.14.8
plotly==6.4.0
pluggy==1.7.0
prometheus_client==0.23.1
propcache==0.5.4
protobuf==7.36.2
psutil==7.0.0
pyarrow==26.0.1
pycparser==3.12
pydantic==2.14.4
pydantic-settings==2.16.3
pydantic_core==2.50.5
Pygments==2.21.0
pyparsing==3.3.3
pytest==9.2.0
pytest-timeout==2.4.0
python-dateutil==4.0.0
python-dotenv==1.2.4
python-json-logger==4.2.0
python-multipart==0.0.34
pytz==2026.6
PyYAML==6.0.4
pyzmq==26.4.0
regex==2026.11.19
requests==2.34.2
retrying==1.4.2
rich==14.1.0
rich-rst==2.2.0
ruamel.yaml==0.18.17
ruamel.yaml.clib==0.2.15
safetensors==0.8.0
scipy==1.17.1
seaborn==0.13.2
sentencepiece==0.2.3
setproctitle==1.3.8
shellingham==1.5.4
simplejson==4.3.0
six==1.17.0
soundfile==0.13.1
SQLAlchemy==2.1.9
starlette==1.10.0
starlette-compress==2.0.0
textual==5.3.0
tiktoken==0.14.0
tokenizers==0.23.3
tqdm==4.70.1
transformers==5.24.0
typer==0.29.2
typing-inspection==0.4.5
typing_extensions==4.16.0
tzdata==2026.6
urllib3==2.8.0
uvicorn==0.54.0
uvloop==0.23.0
watchfiles==1.3.0
websockets==17.4
Werkzeug==3.1.9
xxhash==4.1.0
yarl==1.25.1
zipp==4.1.2
zstandard==0.25.0
LOCK
}

main
