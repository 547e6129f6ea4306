#!/usr/bin/python3
"""Test oracle for tests/test_image.c: images written and read back by Pillow, Pillow's
resizes, and Hugging Face ViTImageProcessor's arithmetic (written out with numpy, float32).

pil_images.py DIR writes into DIR:
  <name>.png / .jpg      an image file
  <name>.raw             Pillow's pixels of it (h w c as text on the first line, then bytes)
  rs-<k>.raw / .src.raw  a source and Pillow's resize of it (first line: h w c H W resample)
  pp.raw                 the ViT preprocessing of pp-src.png (float32, channels first)
"""
import io
import random
import sys

import numpy as np
from PIL import Image

out = sys.argv[1]
rng = random.Random(7)


def noise(w, h, c):
    # smooth plus noise, so resizes and JPEG see structure and detail
    a = np.zeros((h, w, c), dtype=np.float64)
    for ch in range(c):
        fx, fy = rng.uniform(0.05, 0.4), rng.uniform(0.05, 0.4)
        yy, xx = np.mgrid[0:h, 0:w]
        a[:, :, ch] = 127 + 90 * np.sin(xx * fx + ch) * np.cos(yy * fy)
    a += np.array([[[rng.uniform(-30, 30) for _ in range(c)] for _ in range(w)] for _ in range(h)])
    return np.clip(a, 0, 255).astype(np.uint8)


def dump(name, arr):
    arr = np.asarray(arr, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    h, w, c = arr.shape
    with open(f"{out}/{name}.raw", "wb") as f:
        f.write(f"{h} {w} {c}\n".encode())
        f.write(arr.tobytes())


def from_arr(a):
    return Image.fromarray(a[:, :, 0] if a.shape[2] == 1 else a)


# decoding: each file, and the pixels Pillow gives for it in fedpeft's channel layout
rgb = noise(37, 23, 3)
gray = noise(31, 17, 1)
rgba = noise(19, 13, 4)
la = noise(11, 9, 2)
from_arr(rgb).save(f"{out}/rgb.png")
dump("rgb", rgb)
from_arr(gray).save(f"{out}/gray.png")
dump("gray", gray)
from_arr(rgba).save(f"{out}/rgba.png")
dump("rgba", rgba)
Image.fromarray(la, "LA").save(f"{out}/la.png")
dump("la", la)
pal = from_arr(rgb).quantize(colors=13)
pal.save(f"{out}/palette.png")
dump("palette", np.array(pal.convert("RGB")))
pal.info["transparency"] = 3
pal.save(f"{out}/palette-trns.png", transparency=3)
dump("palette-trns", np.array(Image.open(f"{out}/palette-trns.png").convert("RGBA")))
bw = from_arr(gray).convert("1")
bw.save(f"{out}/bits1.png")
dump("bits1", np.array(bw.convert("L")))
from_arr(rgb).save(f"{out}/rgb.jpg", quality=90)
dump("rgb-jpg", np.array(Image.open(f"{out}/rgb.jpg").convert("RGB")))
from_arr(gray).save(f"{out}/gray.jpg", quality=85)
dump("gray-jpg", np.array(Image.open(f"{out}/gray.jpg")))
# progressive JPEG, 4:2:0 subsampling (Pillow's default at these qualities)
from_arr(rgb).save(f"{out}/progressive.jpg", quality=75, progressive=True)
dump("progressive-jpg", np.array(Image.open(f"{out}/progressive.jpg").convert("RGB")))

# resizes: down and up, by integer and odd factors, both filters, gray and RGB
cases = [((37, 23, 3), (16, 16), 2), ((37, 23, 3), (64, 50), 2), ((31, 17, 1), (7, 5), 2),
         ((31, 17, 1), (31, 40), 3), ((37, 23, 3), (10, 23), 3), ((28, 28, 1), (224, 224), 2),
         ((300, 200, 3), (224, 224), 2), ((37, 23, 3), (37, 11), 2)]
for k, ((w, h, c), (W, H), rs) in enumerate(cases):
    src = noise(w, h, c)
    res = np.array(from_arr(src).resize((W, H), resample=rs, reducing_gap=None))
    if res.ndim == 2:
        res = res[:, :, None]
    with open(f"{out}/rs-{k}.raw", "wb") as f:
        f.write(f"{h} {w} {c} {H} {W} {rs}\n".encode())
        f.write(src.tobytes())
        f.write(res.tobytes())
with open(f"{out}/rs.count", "w") as f:
    f.write(str(len(cases)))

# preprocessing as ViTImageProcessor does it: PIL resize, rescale in float64 → float32,
# normalise in float32, channels first
src = noise(45, 33, 3)
from_arr(src).save(f"{out}/pp-src.png")
res = np.array(from_arr(src).resize((32, 32), resample=2, reducing_gap=None))
x = (res.astype(np.float64) * (1 / 255)).astype(np.float32)
mean = np.array([0.485, 0.456, 0.406], dtype=np.float32)
std = np.array([0.229, 0.224, 0.225], dtype=np.float32)
y = ((x - mean) / std).transpose(2, 0, 1).astype(np.float32)
with open(f"{out}/pp.raw", "wb") as f:
    f.write(y.tobytes())

# an ImageFolder tree: a folder per class, PNG and JPEG mixed, in a sub-folder too; and what
# ViTImageProcessor (resize 8 × 8 bilinear, rescale, normalise 0.5/0.5) makes of each, in the
# order fedpeft reads them (classes by name, files by path within a class)
import os  # noqa: E402
tree = f"{out}/tree"
for cls, n in (("boot", 3), ("coat", 2)):
    os.makedirs(f"{tree}/{cls}/more", exist_ok=True)
    for i in range(n):
        a = noise(12 + i, 10, 3)
        ext = "png" if i % 2 == 0 else "jpg"
        sub = "more/" if i == 2 else ""
        from_arr(a).save(f"{tree}/{cls}/{sub}{i}.{ext}")
with open(f"{tree}/README.txt", "w") as f:
    f.write("not a class\n")
rows = []
for cls in sorted(os.listdir(tree)):
    if not os.path.isdir(f"{tree}/{cls}"):
        continue
    files = []
    for root, _, names in os.walk(f"{tree}/{cls}"):
        files += [os.path.join(root, n) for n in names]
    for path in sorted(files):
        im = Image.open(path).convert("RGB")
        r = np.array(im.resize((8, 8), resample=2, reducing_gap=None))
        x = (r.astype(np.float64) * (1 / 255)).astype(np.float32)
        rows.append(((x - np.float32(0.5)) / np.float32(0.5)).transpose(2, 0, 1))
with open(f"{out}/tree.raw", "wb") as f:
    f.write(np.stack(rows).astype(np.float32).tobytes())
