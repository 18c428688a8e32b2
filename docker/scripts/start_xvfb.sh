#!/usr/bin/env bash
# Entrypoint of the drifting-vla images: prepare the container, then run the given command.
#
#   1. No DISPLAY set and Xvfb installed (the RLBench image): start Xvfb on :99 with GLX and wait
#      until it accepts connections. CoppeliaSim 4.1 has no EGL backend and needs an X server.
#   2. COPPELIASIM_ROOT set: point Qt and the dynamic linker at CoppeliaSim's bundled libraries.
#   3. WANDB_API_KEY set: log into WandB without a prompt (the key is read from the environment,
#      never passed on a command line or printed). A failed login warns; it does not stop the run.
#   4. Mark /workspace a safe git directory (a mounted checkout belongs to another uid).
#   5. exec the command (default: bash), so it receives signals directly.
#
# Knobs: XVFB_DISPLAY (default :99), XVFB_SCREEN (default 1024x768x24), XVFB_TIMEOUT (seconds,
# default 20), X11_SOCKET_DIR (default /tmp/.X11-unix), XVFB_LOG (default /tmp/xvfb.log).
set -euo pipefail

log() { echo "[start_xvfb] $*" >&2; }

# An arbitrary `--user uid:gid` has no passwd entry and may have an unwritable HOME; Python's
# getpass.getuser() (used by torch.compile's cache) and git both need these.
if ! whoami >/dev/null 2>&1; then
    export USER="${USER:-user$(id -u)}"
    export LOGNAME="${LOGNAME:-${USER}}"
fi
if [[ -z "${HOME:-}" || ! -w "${HOME}" ]]; then
    HOME="$(mktemp -d)"
    export HOME
    log "HOME was not writable; using ${HOME}"
fi

start_xvfb() {
    local display="${XVFB_DISPLAY:-:99}"
    local screen="${XVFB_SCREEN:-1024x768x24}"
    local timeout="${XVFB_TIMEOUT:-20}"
    local socket_dir="${X11_SOCKET_DIR:-/tmp/.X11-unix}"
    local xvfb_log="${XVFB_LOG:-/tmp/xvfb.log}"
    local socket="${socket_dir}/X${display#:}"

    Xvfb "${display}" -screen 0 "${screen}" +extension GLX +render -noreset >"${xvfb_log}" 2>&1 &
    local pid=$!
    local deadline=$((SECONDS + timeout))
    until [[ -e "${socket}" ]]; do
        if ! kill -0 "${pid}" 2>/dev/null; then
            log "ERROR: Xvfb exited before ${display} came up. Its log (${xvfb_log}):"
            cat "${xvfb_log}" >&2 || true
            log "A stale lock (/tmp/.X${display#:}-lock) or another server on ${display} is the usual cause;" \
                "run with --rm, or set DISPLAY to an X server you already have."
            exit 1
        fi
        if ((SECONDS >= deadline)); then
            log "ERROR: Xvfb did not open ${socket} within ${timeout}s (XVFB_TIMEOUT). Its log (${xvfb_log}):"
            cat "${xvfb_log}" >&2 || true
            kill "${pid}" 2>/dev/null || true
            exit 1
        fi
        sleep 0.1
    done
    export DISPLAY="${display}"
    log "Xvfb is up on ${DISPLAY} (${screen})"
}

if [[ -z "${DISPLAY:-}" ]]; then
    if command -v Xvfb >/dev/null 2>&1; then
        start_xvfb
    else
        log "no DISPLAY and no Xvfb: headless rendering only (MuJoCo uses MUJOCO_GL=${MUJOCO_GL:-egl})"
    fi
fi

if [[ -n "${COPPELIASIM_ROOT:-}" ]]; then
    if [[ ! -e "${COPPELIASIM_ROOT}/libcoppeliaSim.so" ]]; then
        log "WARNING: COPPELIASIM_ROOT=${COPPELIASIM_ROOT} holds no libcoppeliaSim.so; RLBench will not start"
    fi
    export QT_QPA_PLATFORM_PLUGIN_PATH="${QT_QPA_PLATFORM_PLUGIN_PATH:-${COPPELIASIM_ROOT}}"
    case ":${LD_LIBRARY_PATH:-}:" in
        *":${COPPELIASIM_ROOT}:"*) ;;
        *) export LD_LIBRARY_PATH="${COPPELIASIM_ROOT}${LD_LIBRARY_PATH:+:${LD_LIBRARY_PATH}}" ;;
    esac
fi

if [[ -n "${WANDB_API_KEY:-}" ]]; then
    case "${WANDB_MODE:-online}" in
        offline | disabled | dryrun)
            log "WANDB_MODE=${WANDB_MODE}: skipping the WandB login" ;;
        *)
            if command -v wandb >/dev/null 2>&1 && wandb login </dev/null >/dev/null 2>&1; then
                log "logged into WandB"
            else
                log "WARNING: WandB login failed (network or key?); the run continues, and wandb will" \
                    "report the problem when it starts. Set WANDB_MODE=offline to log locally."
            fi ;;
    esac
fi

if command -v git >/dev/null 2>&1; then
    if ! git config --global --get-all safe.directory 2>/dev/null | grep -qxF /workspace; then
        git config --global --add safe.directory /workspace
    fi
fi

if [[ $# -eq 0 ]]; then
    set -- bash
fi
exec "$@"
