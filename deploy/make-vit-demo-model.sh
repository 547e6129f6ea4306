#!/bin/sh
# deploy/make-vit-demo-model.sh [OUT_DIR] — rebuild the imaging demo's base model
# (models/vit-demo) from Debian's dataset-fashion-mnist, with fedpeft's own trainer.
#
# A 139 k-parameter ViT (dim 64, 4 layers, 4 heads, MLP 128, 28 × 28 gray images in patches
# of 7, the 10 Fashion-MNIST labels) pretrained on every weight on the first 30 000 training
# images of classes 0-4 only (T-shirt/top, Trouser, Pullover, Dress, Coat), and saved as a
# backbone, without its classifier. `fedpeft sim --task image` gives its sites images of
# classes 5-9 (Sandal, Shirt, Sneaker, Bag, Ankle boot) from the other 30 000: classes and
# images the base never saw, which a federation must learn with a new head.
#
# The result is identical bit for bit on the same kind of CPU; elsewhere it is an equivalent
# model. About 1.5 minutes on 2 cores.
set -eu
top=$(cd "$(dirname "$0")/.." && pwd)
fp=${FEDPEFT:-$top/build/cli/fedpeft}
out=${1:-$top/models/vit-demo}
D=/usr/share/datasets/fashion-mnist
[ -r "$D/train-images-idx3-ubyte.gz" ] || {
    echo "install dataset-fashion-mnist: deploy/setup.sh deps" >&2
    exit 1
}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$fp" vision init --out "$tmp/init" --dim 64 --layers 4 --heads 4 --ff 128 --image 28 \
    --patch 7 --seed 1 \
    --labels "T-shirt/top,Trouser,Pullover,Dress,Coat,Sandal,Shirt,Sneaker,Bag,Ankle boot"
"$fp" vision pretrain --model "$tmp/init" --images "$D/train-images-idx3-ubyte.gz" \
    --labels "$D/train-labels-idx1-ubyte.gz" --count 30000 --classes 0-4 --steps 1500 \
    --batch 64 --seed 1 --backbone --out "$tmp/model"
rm -rf "$out"
mkdir -p "$(dirname "$out")"
cp -r "$tmp/model" "$out"
echo "$out: the imaging demo's base (a backbone: no classifier)"
