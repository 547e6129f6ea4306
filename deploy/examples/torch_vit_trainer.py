#!/usr/bin/env python3
"""fedpeft external trainer for imaging sites: the contract's example for a vision transformer,
in plain PyTorch.

fedpeft-client (train.trainer = external, a model directory holding a ViT) runs this once per
task with the task directory as its last argument (see `man fedpeft-client` and
deploy/examples/README.md):

    trainer_command = python3 /usr/share/doc/fedpeft-client/examples/torch_vit_trainer.py

It reads task.json ("task": "image-classification"), the base model (Hugging Face's
ViTForImageClassification layout: config.json, model.safetensors and preprocessor_config.json,
read without any library beyond PyTorch), the site's images and the starting adapter in start/
— the LoRA factors and the classifier head, which PEFT saves as modules_to_save — plus fold/,
the global update, for restart strategies; trains the factors and the head with AdamW; writes
out/ (an HF PEFT adapter with its head), result.json and, as it goes, progress.json.

Needs only Debian's python3-torch; python3-pil for ImageFolder trees (and for resizing, which
IDX files of the model's size never need). Images are prepared as fedpeft prepares them
(preprocessor_config.json: convert to RGB, resize, rescale, normalise), so the held-out loss it
reports is the one fedpeft's built-in trainer measures on the same images: the mean over the
images of the true label's cross-entropy. The held-out images are `eval_files` when the site
names them, else a seeded fraction of its own (this trainer's split, not fedpeft's).
"""
import gzip
import json
import math
import os
import random
import struct
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_trainer import (DEVICE, adapter_factors, fit, fold_in, open_task,  # noqa: E402
                           read_safetensors, write_output)

HEAD = ("classifier.weight", "classifier.bias")
IMAGE_EXT = (".png", ".jpg", ".jpeg")


# ---- images, as fedpeft reads and prepares them -----------------------------------------------

def read_idx(path):
    """An IDX file (plain or gzip'd) of unsigned bytes: (dims, raw bytes)."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    if len(data) < 4 or data[0] or data[1] or data[2] != 8 or not 1 <= data[3] <= 4:
        sys.exit(f"{path}: not an IDX file of unsigned bytes")
    nd = data[3]
    dims = struct.unpack(f">{nd}I", data[4:4 + 4 * nd])
    body = data[4 + 4 * nd:]
    if len(body) != math.prod(dims):
        sys.exit(f"{path}: {len(body)} bytes of data, the header says {math.prod(dims)}")
    return dims, body


def preprocessing(model_dir, cfg):
    """preprocessor_config.json with HF ViTImageProcessor's defaults for what it lacks."""
    S = cfg["image_size"]
    p = {"do_convert_rgb": None, "do_resize": True, "size": {"height": S, "width": S},
         "resample": 2, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
         "image_mean": [0.5] * (1 if cfg.get("num_channels", 3) == 1 else 3),
         "image_std": [0.5] * (1 if cfg.get("num_channels", 3) == 1 else 3)}
    path = os.path.join(model_dir, "preprocessor_config.json")
    if os.path.exists(path):
        with open(path) as f:
            p.update(json.load(f))
    size = p["size"]
    p["height"] = size.get("height", size.get("shortest_edge", S))
    p["width"] = size.get("width", S)
    return p


def prepare(images, channels, S, p, name):
    """uint8 images N × H × W × C (a tensor) as the model's input N × C × S × S, float32."""
    n, h, w, c = images.shape
    if p.get("do_convert_rgb") and channels == 3 and c == 1:
        images, c = images.expand(n, h, w, 3), 3
    if c != channels:
        sys.exit(f"{name}: {c}-channel images; the model takes {channels}")
    if p["do_resize"] and (p["height"] != S or p["width"] != S):
        sys.exit(f"{name}: the preprocessor resizes to {p['width']}x{p['height']}; the model "
                 f"takes {S}x{S}")
    if p["do_resize"] and (h != S or w != S):
        try:
            from PIL import Image
        except ImportError:
            sys.exit(f"{name}: {w}x{h} images need resizing to {S}x{S}: install python3-pil")
        mode = "L" if c == 1 else "RGB"
        out = []
        for im in images:
            a = im[..., 0] if c == 1 else im
            r = Image.fromarray(a.numpy(), mode).resize((S, S), resample=p["resample"])
            out.append(torch.frombuffer(bytearray(r.tobytes()), dtype=torch.uint8).view(S, S, c))
        images, h, w = torch.stack(out), S, S
    if h != S or w != S:
        sys.exit(f"{name}: {w}x{h} pixels; the model takes {S}x{S}")
    x = images.permute(0, 3, 1, 2).to(torch.float64)
    if p["do_rescale"]:
        x = x * p["rescale_factor"]
    x = x.to(torch.float32)
    if p["do_normalize"]:
        mean = torch.tensor(p["image_mean"], dtype=torch.float32)
        std = torch.tensor(p["image_std"], dtype=torch.float32)
        x = (x - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
    return x


def image_folder(root, cfg):
    """An ImageFolder tree: a folder per class named as the model's labels, at any depth."""
    try:
        from PIL import Image
    except ImportError:
        sys.exit(f"{root}: ImageFolder trees need python3-pil (IDX files do not)")
    names = {v: int(k) for k, v in cfg.get("id2label", {}).items()}
    ims, labels = [], []
    for cls in sorted(os.listdir(root)):
        if not os.path.isdir(os.path.join(root, cls)):
            continue
        if cls not in names:
            sys.exit(f"{root}: class folder '{cls}' is none of the model's labels")
        for d, _, files in sorted(os.walk(os.path.join(root, cls))):
            for fn in sorted(files):
                if fn.lower().endswith(IMAGE_EXT):
                    with Image.open(os.path.join(d, fn)) as im:
                        ims.append(im.copy())
                        labels.append(names[cls])
    return ims, labels


def load_images(files, cfg, p, what):
    """(inputs N × C × S × S, labels N) of a site's files: an IDX pair or ImageFolder trees."""
    C, S = cfg.get("num_channels", 3), cfg["image_size"]
    if len(files) == 2 and all(not os.path.isdir(f) for f in files):
        a, b = (read_idx(f) for f in files)
        (idims, ibody, ipath), (ldims, lbody) = ((a[0], a[1], files[0]), b) if len(a[0]) > 1 \
            else ((b[0], b[1], files[1]), a)
        if len(ldims) != 1 or ldims[0] != idims[0]:
            sys.exit(f"{what}: {ldims} labels for {idims[0]} images")
        im = torch.frombuffer(bytearray(ibody), dtype=torch.uint8)
        im = im.view(idims[0], idims[1], idims[2], idims[3] if len(idims) == 4 else 1)
        labels = torch.tensor(list(lbody), dtype=torch.long)
        x = prepare(im, C, S, p, ipath)
    elif all(os.path.isdir(f) for f in files):
        xs, labels = [], []
        for root in files:
            ims, lab = image_folder(root, cfg)
            for i, pic in enumerate(ims):
                if pic.mode not in ("L", "RGB"):
                    pic = pic.convert("RGB" if p.get("do_convert_rgb") else pic.mode)
                c = 1 if pic.mode == "L" else 3
                t = torch.frombuffer(bytearray(pic.tobytes()), dtype=torch.uint8)
                xs.append(prepare(t.view(1, pic.height, pic.width, c), C, S, p,
                                  f"{root} image {i}"))
            labels += lab
        x, labels = torch.cat(xs), torch.tensor(labels, dtype=torch.long)
    else:
        sys.exit(f"{what}: an IDX pair (images, labels) or ImageFolder directories")
    K = len(cfg.get("id2label", {})) or cfg.get("num_labels", 2)
    if labels.numel() and int(labels.max()) >= K:
        sys.exit(f"{what}: label {int(labels.max())}; the model has {K}")
    return x, labels


# ---- the model ------------------------------------------------------------------------------

class ViT:
    """ViTForImageClassification over frozen weights, LoRA on named linears, a trained head
    (transformers' modeling_vit: conv patches, CLS token, pre-LayerNorm blocks, exact GELU)."""

    def __init__(self, cfg, w, device):
        if cfg.get("hidden_act", "gelu") != "gelu":
            sys.exit(f"hidden_act {cfg['hidden_act']!r}: only gelu is supported")
        self.c = cfg
        self.w = {k: v.to(device) for k, v in w.items()}
        self.D, self.H = cfg["hidden_size"], cfg["num_attention_heads"]
        self.eps = cfg.get("layer_norm_eps", 1e-12)
        self.lora = {}  # module -> (A, B, scale)
        self.head = None  # (weight K × D, bias K)

    def linear(self, x, name):
        y = F.linear(x, self.w[name + ".weight"], self.w.get(name + ".bias"))
        if name in self.lora:
            A, B, s = self.lora[name]
            y = y + (x @ A.t()) @ B.t() * s
        return y

    def norm(self, x, name):
        return F.layer_norm(x, (self.D,), self.w[name + ".weight"], self.w[name + ".bias"],
                            self.eps)

    def forward(self, x):
        w, b, D, H, P = self.w, x.shape[0], self.D, self.H, self.c["patch_size"]
        e = F.conv2d(x, w["vit.embeddings.patch_embeddings.projection.weight"],
                     w["vit.embeddings.patch_embeddings.projection.bias"], stride=P)
        h = torch.cat([w["vit.embeddings.cls_token"].expand(b, -1, -1),
                       e.flatten(2).transpose(1, 2)], dim=1)
        h = h + w["vit.embeddings.position_embeddings"]
        T, hd = h.shape[1], D // H
        for l in range(self.c["num_hidden_layers"]):
            p = f"vit.encoder.layer.{l}."
            a = self.norm(h, p + "layernorm_before")
            q, k, v = (self.linear(a, p + "attention.attention." + n).view(b, T, H, hd)
                       .transpose(1, 2) for n in ("query", "key", "value"))
            att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1) @ v
            h = h + self.linear(att.transpose(1, 2).reshape(b, T, D),
                                p + "attention.output.dense")
            m = self.norm(h, p + "layernorm_after")
            h = h + self.linear(F.gelu(self.linear(m, p + "intermediate.dense")),
                                p + "output.dense")
        z = self.norm(h[:, 0], "vit.layernorm")
        return F.linear(z, *self.head)


def evaluate(model, x, y, batch):
    """Mean cross-entropy over the images and the accuracy."""
    total, right = 0.0, 0
    with torch.no_grad():
        for i in range(0, x.shape[0], batch):
            logits = model.forward(x[i:i + batch].to(DEVICE))
            t = y[i:i + batch].to(DEVICE)
            total += F.cross_entropy(logits, t, reduction="sum").item()
            right += int((logits.argmax(-1) == t).sum())
    n = x.shape[0]
    return (total / n, right / n) if n else (float("nan"), float("nan"))


def main():
    task, cfg, rng, t0 = open_task("image-classification", "torch_trainer.py")
    h = task["hyper"]
    weights = read_safetensors(os.path.join(task["model_dir"], "model.safetensors"))
    fold_in(weights, task, cfg)
    model = ViT(cfg, weights, DEVICE)
    start_t = read_safetensors(os.path.join(task["start"], "adapter_model.safetensors"))
    head = [start_t.pop("base_model.model." + k, None) for k in HEAD]
    if any(t is None for t in head):
        sys.exit("start/ holds no classifier head (modules_to_save): not an imaging task's")
    head_w, head_b = (t.to(DEVICE).requires_grad_(True) for t in head)
    bias_shape = head[1].shape
    model.head = (head_w, head_b.view(-1))
    start, adapter_config = adapter_factors(task["start"], cfg)  # LoRA factors only
    params = [head_w, head_b]
    for mod, (A, B, s) in start.items():
        A = A.to(DEVICE).requires_grad_(not task["freeze_a"])
        B = B.to(DEVICE).requires_grad_(True)
        model.lora[mod] = (A, B, s)
        params += [B] if task["freeze_a"] else [A, B]

    p = preprocessing(task["model_dir"], cfg)
    x, y = load_images(task["data_files"], cfg, p, "data_files")
    if task.get("eval_files"):
        hx, hy = load_images(task["eval_files"], cfg, p, "eval_files")
    else:  # hold out a fraction of the images (this trainer's own split)
        order = list(range(x.shape[0]))
        random.Random(task.get("split_seed", 1)).shuffle(order)
        # as many as fedpeft holds out (its rounding), so the images trained on never
        # exceed the count the daemon checks "samples" against; 0: none held out
        n, frac = len(order), task.get("eval_fraction", 0.1)
        k = int(frac * n + 0.5) if frac > 0 else 0
        if frac > 0 and not 1 <= k < n:
            sys.exit(f"data_files: holding out {frac} of {n} images leaves none on one side")
        idx = torch.tensor(order, dtype=torch.long)
        hx, hy, x, y = x[idx[:k]], y[idx[:k]], x[idx[k:]], y[idx[k:]]
    if x.shape[0] == 0:
        sys.exit("data_files: no training images")
    Bsz = h["batch"] or 16
    steps = max(1, min(h["steps"], task.get("max_steps", h["steps"])))
    before, acc0 = evaluate(model, hx, hy, Bsz)

    def batch_loss():
        pick = torch.tensor([rng.randrange(x.shape[0]) for _ in range(Bsz)])
        return F.cross_entropy(model.forward(x[pick].to(DEVICE)), y[pick].to(DEVICE))

    loss_v = fit(params, h, steps, batch_loss)  # AdamW, cosine, clip 1, FedProx
    after, acc = evaluate(model, hx, hy, Bsz)

    result = {"samples": int(x.shape[0]), "train_loss": loss_v, "seconds": time.time() - t0}
    if hx.shape[0]:
        result.update(eval_loss_before=before, eval_loss_after=after)
    write_output(model.lora, adapter_config, result,
                 {HEAD[0]: head_w, HEAD[1]: head_b.view(bias_shape)})
    print(f"trained {steps} steps on {x.shape[0]} images: held-out loss {before:.4f} -> "
          f"{after:.4f}, accuracy {100 * acc0:.1f} % -> {100 * acc:.1f} %", flush=True)


if __name__ == "__main__":
    main()
