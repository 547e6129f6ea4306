#!/usr/bin/env python3
"""PyTorch peer of `fedpeft bench train --config vit-small`: the same ViT (HF's
ViTForImageClassification: patch convolution, CLS token and position embeddings, pre-LayerNorm
blocks with biases, exact GELU, final LayerNorm, classifier) with LoRA on query and value, the
base frozen and the classifier trained in full, AdamW, random images and labels; written as a
PyTorch user would (eager mode). Prints one JSON line: images_per_s, seconds_per_step,
peak_rss_bytes."""
import argparse
import json
import math
import resource
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class LoRALinear(nn.Module):
    def __init__(self, d_in, d_out, r, alpha):
        super().__init__()
        self.base = nn.Linear(d_in, d_out)
        self.base.requires_grad_(False)
        self.lora_A = nn.Linear(d_in, r, bias=False)
        self.lora_B = nn.Linear(r, d_out, bias=False)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.normal_(self.lora_B.weight, std=0.02)
        self.scale = alpha / r

    def forward(self, x):
        return self.base(x) + self.lora_B(self.lora_A(x)) * self.scale


def frozen(m):
    m.requires_grad_(False)
    return m


class Block(nn.Module):
    def __init__(self, a):
        super().__init__()
        D, r = a.dim, a.rank
        self.h, self.hd = a.heads, a.dim // a.heads
        self.ln1, self.ln2 = frozen(nn.LayerNorm(D, eps=1e-12)), frozen(nn.LayerNorm(D, eps=1e-12))
        self.q = LoRALinear(D, D, r, 2.0 * r)
        self.k = frozen(nn.Linear(D, D))
        self.v = LoRALinear(D, D, r, 2.0 * r)
        self.o = frozen(nn.Linear(D, D))
        self.fc1, self.fc2 = frozen(nn.Linear(D, a.ff)), frozen(nn.Linear(a.ff, D))

    def forward(self, x):
        B, T, D = x.shape
        h = self.ln1(x)
        q = self.q(h).view(B, T, self.h, self.hd).transpose(1, 2)
        k = self.k(h).view(B, T, self.h, self.hd).transpose(1, 2)
        v = self.v(h).view(B, T, self.h, self.hd).transpose(1, 2)
        att = F.softmax((q @ k.transpose(-1, -2)) / math.sqrt(self.hd), dim=-1) @ v
        x = x + self.o(att.transpose(1, 2).reshape(B, T, D))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class ViT(nn.Module):
    def __init__(self, a):
        super().__init__()
        n = (a.image // a.patch) ** 2
        self.patch = frozen(nn.Conv2d(a.channels, a.dim, a.patch, a.patch))
        self.cls = nn.Parameter(torch.randn(1, 1, a.dim) * 0.02, requires_grad=False)
        self.pos = nn.Parameter(torch.randn(1, n + 1, a.dim) * 0.02, requires_grad=False)
        self.blocks = nn.ModuleList(Block(a) for _ in range(a.layers))
        self.ln = frozen(nn.LayerNorm(a.dim, eps=1e-12))
        self.head = nn.Linear(a.dim, a.labels)

    def forward(self, px):
        x = self.patch(px).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        for b in self.blocks:
            x = b(x)
        return self.head(self.ln(x[:, 0]))


def main():
    p = argparse.ArgumentParser()
    for k in ("dim", "layers", "heads", "ff", "image", "patch", "channels", "labels", "batch",
              "rank", "steps", "threads"):
        p.add_argument("--" + k, type=int, required=True)
    p.add_argument("--bf16", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    m = ViT(a)
    opt = torch.optim.AdamW([q for q in m.parameters() if q.requires_grad], lr=1e-3)
    px = torch.randn(a.batch, a.channels, a.image, a.image)
    y = torch.randint(0, a.labels, (a.batch,))

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=a.bf16):
            loss = F.cross_entropy(m(px), y)
        loss.backward()
        opt.step()

    step()  # warm-up
    t0 = time.perf_counter()
    for _ in range(a.steps):
        step()
    dt = (time.perf_counter() - t0) / a.steps
    print(json.dumps({"images_per_s": a.batch / dt, "seconds_per_step": dt,
                      "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))


if __name__ == "__main__":
    main()
