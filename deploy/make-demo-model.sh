#!/bin/sh
# deploy/make-demo-model.sh [OUT_DIR] — rebuild the demo base model (models/demo) from
# Debian's fortunes packages, with fedpeft's own trainer.
#
# A 3.0 M-parameter Llama-family decoder (dim 256, 4 layers, 8 heads / 4 key-value heads,
# SwiGLU 688, byte-level tokenizer of 257 tokens) pretrained on general text in English,
# German, Italian, Spanish, Polish, Czech, Russian, Bulgarian and Chinese. The files the demo
# gives its sites (`fedpeft sim --print-data`: the English topical categories and one file or
# two per language) are left out on purpose: they are the sites' private data, which the base
# model must not have seen; Portuguese, Esperanto and Irish it never sees at all.
#
# The result is identical bit for bit on the same kind of CPU with the same thread count (2);
# elsewhere it is an equivalent model. About 33 minutes on 2 cores.
set -eu
export LC_ALL=C # file order
top=$(cd "$(dirname "$0")/.." && pwd)
fp=${FEDPEFT:-$top/build/cli/fedpeft}
out=${1:-$top/models/demo}
F=/usr/share/games/fortunes
for p in cookie de/zitate it/italia es/refranes.fortunes pl/linuxpl cs/citace ru/love bg/history \
         tang300; do
    [ -r "$F/$p" ] || { echo "install the fortunes packages: deploy/setup.sh deps" >&2; exit 1; }
done
demo=$("$fp" sim --print-data | cut -f2)
files=""
for c in art cookie debian definitions disclaimer ethnic fortunes goedel humorists knghtbrd \
         linuxcookie literature magic men-women miscellaneous news paradoxum people perl \
         platitudes pratchett riddles songs-poems startrek tao translate-me wisdom zippy \
         tang300 song100; do
    files="$files $F/$c"
done
for d in de it es pl cs ru bg; do
    for f in "$F/$d"/*; do
        case "$f" in *.dat | *.u8) continue ;; esac
        [ -f "$f" ] && [ ! -L "$f" ] || continue
        case " $(echo $demo) " in *" $f "*) continue ;; esac
        files="$files $f"
    done
done
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$fp" init-model --dim 256 --layers 4 --heads 8 --kv-heads 4 --ff 688 --seq 512 \
    --seed 20261129 --out "$tmp/init"
# shellcheck disable=SC2086
"$fp" pretrain --model "$tmp/init" --data $files --steps 4000 --batch 8 --seq 256 --lr 3e-3 \
    --warmup 100 --weight-decay 0.1 --min-lr 0.1 --eval-frac 0.05 --seed 1 --threads 2 \
    --log-every 200 --dtype bf16 --json --out "$out" | tee "$tmp/pretrain.json"
# the saved (bfloat16) model on the held-out documents, against a uniform guess
# shellcheck disable=SC2086
"$fp" eval --model "$out" --data $files --split heldout --eval-frac 0.05 --seed 1 \
    --seq 256 --threads 2 --json | tee "$out/heldout-eval.json"
