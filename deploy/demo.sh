#!/bin/sh
# deploy/demo.sh — set up this machine, build fedpeft and run its main job on built-in
# defaults: six sites with heterogeneous LoRA ranks (4, 4, 8, 8, 16, 16), merged with every
# strategy that accepts mixed ranks, each measured against the exact weighted update ΔW*;
# then three equal-rank sites with fedavg and FFA-LoRA. Results go to out/demo/.
set -eu
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"
./deploy/setup.sh deps
./deploy/setup.sh build build -DCMAKE_BUILD_TYPE=Release
fp=build/cli/fedpeft
out=out/demo
rm -rf "$out"
mkdir -p "$out"

echo
echo "== six sites, ranks 4 4 8 8 16 16, sample counts 120 340 90 500 260 180 =="
i=0
for r in 4 4 8 8 16 16; do
    i=$((i + 1))
    $fp adapter random --out "$out/site-$i" --layers 4 --dim 512 --kv-dim 128 \
        --targets q_proj,k_proj,v_proj,o_proj --rank "$r" --alpha 16 --seed "$i" >/dev/null
done
sites="$out/site-1 $out/site-2 $out/site-3 $out/site-4 $out/site-5 $out/site-6"
w=120,340,90,500,260,180
for s in zeropad flexlora flora florist; do
    # shellcheck disable=SC2086
    $fp merge --strategy "$s" --weights "$w" --report-error --out "$out/merged-$s" $sites
done
# shellcheck disable=SC2086
$fp merge --strategy flexlora --rank 8 --weights "$w" --report-error --per-site \
    --out "$out/merged-flexlora-r8" $sites

echo
echo "== three sites at rank 8, sharing A (FFA-LoRA) or not =="
for i in 1 2 3; do
    $fp adapter random --out "$out/eq-$i" --layers 4 --dim 512 --kv-dim 128 \
        --targets q_proj,k_proj,v_proj,o_proj --rank 8 --alpha 16 --seed "$((10 + i))" >/dev/null
    $fp adapter random --out "$out/ffa-$i" --layers 4 --dim 512 --kv-dim 128 \
        --targets q_proj,k_proj,v_proj,o_proj --rank 8 --alpha 16 --seed "$((20 + i))" \
        --shared-a-seed 7 >/dev/null
done
$fp merge --strategy fedavg --weights 1,2,3 --report-error --out "$out/merged-fedavg" \
    "$out/eq-1" "$out/eq-2" "$out/eq-3"
$fp merge --strategy ffa --weights 1,2,3 --report-error --out "$out/merged-ffa" \
    "$out/ffa-1" "$out/ffa-2" "$out/ffa-3"

echo
echo "Exact strategies (flora, ffa) reproduce the weighted update to float32 rounding;"
echo "flexlora and florist give the best approximation of their rank; fedavg and zeropad"
echo "lose the cross terms. Merged adapters are Hugging Face PEFT directories in $out/."
echo "Inspect one:  $fp adapter info $out/merged-flexlora"
echo "Measure:      $fp bench merge"
