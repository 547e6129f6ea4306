#!/bin/sh
# deploy/demo.sh — set up this machine, build fedpeft, and run its main job on built-in
# defaults: a federated round on one machine, without the network.
#
# Three sites hold different private data (Debian's fortunes: computers, science, medicine)
# and ranks 4, 8 and 16. Each fine-tunes a LoRA adapter of the demo base model (models/demo)
# on its own data with the built-in trainer; the adapters are merged with each strategy that
# takes mixed ranks; base, site and merged adapters are evaluated on held-out fortunes of all
# three sites, which no site trained on. Results go to out/demo/.
set -eu
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"
./deploy/setup.sh deps
./deploy/setup.sh build build -DCMAKE_BUILD_TYPE=Release
fp=build/cli/fedpeft
model=models/demo
out=out/demo
fortunes=/usr/share/games/fortunes
rm -rf "$out"
mkdir -p "$out/data"

# Every 10th fortune of each site is held out; the rest is that site's training data.
for cat in computers science medicine; do
    awk -v train="$out/data/$cat.train" -v held="$out/data/$cat.heldout" \
        'BEGIN { RS = "%\n" } { print $0 "%" > ((NR % 10 == 0) ? held : train) }' \
        "$fortunes/$cat"
done
cat "$out"/data/*.heldout > "$out/data/pooled.heldout"

echo "== three sites fine-tune LoRA adapters on their own data (base frozen) =="
set -- computers 4 science 8 medicine 16
sites="" weights=""
while [ $# -gt 0 ]; do
    cat=$1 rank=$2
    shift 2
    docs=$(grep -c '^%$' "$out/data/$cat.train")
    printf '%-10s rank %-2s %5s fortunes: ' "$cat" "$rank" "$docs"
    $fp train --model "$model" --data "$out/data/$cat.train" --rank "$rank" --alpha 16 \
        --targets all --steps 80 --batch 8 --seq 256 --lr 2e-3 --eval-frac 0 --seed 1 \
        --log-every 0 --out "$out/site-$cat" 2>/dev/null | head -1
    sites="$sites $out/site-$cat"
    weights="$weights${weights:+,}$docs"
done

echo
echo "== the site adapters merged, each strategy (weights: training fortunes per site) =="
for s in zeropad flexlora flora florist; do
    # shellcheck disable=SC2086
    $fp merge --strategy "$s" --weights "$weights" --report-error --out "$out/merged-$s" $sites
done

echo
echo "== held-out fortunes of all three sites (no site trained on them) =="
evaluate() {
    $fp eval --model "$model" "$@" --data "$out/data/pooled.heldout" --seq 256 --json |
        sed 's/.*"loss":\([0-9.]*\).*"perplexity":\([0-9.]*\).*/\1 \2/'
}
printf '%-26s %8s %11s\n' "model" "loss" "perplexity"
set -- $(evaluate)
printf '%-26s %8.4f %11.2f\n' "base (no adapter)" "$1" "$2"
for a in $sites "$out"/merged-*; do
    set -- $(evaluate --adapter "$a")
    printf '%-26s %8.4f %11.2f\n' "$(basename "$a")" "$1" "$2"
done
echo
echo "Adapters are Hugging Face PEFT directories under $out/. Next: $fp bench train"
