#!/usr/bin/env bash
# Rebuild the real-model world shipped in assets/real/ (see assets/real/README.md): the task
# files, then the two LoRA experts of SmolLM2-135M-Instruct, with the exact settings they were
# trained with. Needs the base first: scripts/fetch-smollm2.sh (→ target/smollm2/model).
#
# Usage: scripts/make-real-world.sh [OUT]   (default: assets/real; the adapters go to OUT/arith
# and OUT/roman, which must not exist). Deterministic for the thread count (2 training threads
# here, one per expert, run side by side): about 50 min on the 2-core development machine.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-assets/real}"
base=target/smollm2/model
if [ ! -f "$base/config.json" ]; then
    echo "$base is missing: run scripts/fetch-smollm2.sh first" >&2
    exit 1
fi
cargo build --release --quiet --bin evomerge --example real_world
target/release/examples/real_world --out "$out/tasks"
train() { # NAME STEPS SEED
    target/release/evomerge --threads 1 finetune "$base" "$out/tasks.toml" "$out/$1" \
        --task "$1" --lora-rank 8 --lora-alpha 16 --steps "$2" --batch-size 8 --lr 1e-3 \
        --seed "$3" --log-every 20 --base-name HuggingFaceTB/SmolLM2-135M-Instruct
}
[ -f "$out/tasks.toml" ] || cp assets/real/tasks.toml "$out/tasks.toml"
train arith 300 1 > "$out/arith.log" 2>&1 &
train roman 200 2 > "$out/roman.log" 2>&1 &
wait %1 && wait %2
echo "wrote $out/arith and $out/roman (logs beside them)"
