#!/bin/sh
# deploy/make-demo-model.sh [OUT_DIR] — rebuild the demo base model (models/demo) from
# Debian's fortunes, with fedpeft's own trainer.
#
# A 3.0 M-parameter Llama-family decoder (dim 256, 4 layers, 8 heads / 4 key-value heads,
# SwiGLU 688, byte-level tokenizer of 257 tokens) pretrained on the general fortune
# categories. The topical categories (computers, science, medicine, law, politics, food,
# sports, education, love, linux, work, drugs, pets, kids) are left out on purpose: they are
# the private data of the sites in federated demos, so the base model must not have seen them.
#
# The result is identical bit for bit on the same kind of CPU with the same thread count (2);
# elsewhere it is an equivalent model. About 15 minutes on 2 cores.
set -eu
top=$(cd "$(dirname "$0")/.." && pwd)
fp=${FEDPEFT:-$top/build/cli/fedpeft}
out=${1:-$top/models/demo}
fortunes=/usr/share/games/fortunes
[ -r "$fortunes/cookie" ] || { echo "install Debian's fortunes and fortunes-min" >&2; exit 1; }
files=""
for c in art cookie debian definitions disclaimer ethnic fortunes goedel humorists knghtbrd \
         linuxcookie literature magic men-women miscellaneous news paradoxum people perl \
         platitudes pratchett riddles songs-poems startrek tao translate-me wisdom zippy; do
    files="$files $fortunes/$c"
done
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$fp" init-model --dim 256 --layers 4 --heads 8 --kv-heads 4 --ff 688 --seq 512 \
    --seed 20261129 --out "$tmp/init"
# shellcheck disable=SC2086
"$fp" pretrain --model "$tmp/init" --data $files --steps 3000 --batch 8 --seq 256 --lr 3e-3 \
    --warmup 100 --weight-decay 0.1 --min-lr 0.1 --eval-frac 0.05 --seed 1 --threads 2 \
    --log-every 100 --dtype bf16 --json --out "$out" | tee "$tmp/pretrain.json"
# the saved (bfloat16) model on the held-out documents, against a uniform guess
# shellcheck disable=SC2086
"$fp" eval --model "$out" --data $files --split heldout --eval-frac 0.05 --seed 1 \
    --seq 256 --threads 2 --json | tee "$out/heldout-eval.json"
