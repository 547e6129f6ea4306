#!/usr/bin/env python3
"""PyTorch peer of `fedpeft bench train`: the same Llama-family decoder (RMSNorm, rotate_half
RoPE, grouped-query attention, SwiGLU, untied head) with LoRA on all seven projections, base
frozen, AdamW on the factors, random tokens; written as a PyTorch user would (eager mode).
Prints one JSON line: tokens_per_s, seconds_per_step, peak_rss_bytes."""
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
        self.base = nn.Linear(d_in, d_out, bias=False)
        self.base.weight.requires_grad_(False)
        self.lora_A = nn.Linear(d_in, r, bias=False)
        self.lora_B = nn.Linear(r, d_out, bias=False)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.normal_(self.lora_B.weight, std=0.02)
        self.scale = alpha / r

    def forward(self, x):
        return self.base(x) + self.lora_B(self.lora_A(x)) * self.scale


class RMSNorm(nn.Module):
    def __init__(self, d, eps=1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d), requires_grad=False)
        self.eps = eps

    def forward(self, x):
        var = x.pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(var + self.eps))


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


class Block(nn.Module):
    def __init__(self, a):
        super().__init__()
        self.h, self.kv, self.hd = a.heads, a.kv_heads, a.dim // a.heads
        r, al = a.rank, 2.0 * a.rank
        self.q = LoRALinear(a.dim, self.h * self.hd, r, al)
        self.k = LoRALinear(a.dim, self.kv * self.hd, r, al)
        self.v = LoRALinear(a.dim, self.kv * self.hd, r, al)
        self.o = LoRALinear(self.h * self.hd, a.dim, r, al)
        self.gate = LoRALinear(a.dim, a.ff, r, al)
        self.up = LoRALinear(a.dim, a.ff, r, al)
        self.down = LoRALinear(a.ff, a.dim, r, al)
        self.n1, self.n2 = RMSNorm(a.dim), RMSNorm(a.dim)

    def forward(self, x, cos, sin, mask):
        B, T, _ = x.shape
        h = self.n1(x)
        q = self.q(h).view(B, T, self.h, self.hd).transpose(1, 2)
        k = self.k(h).view(B, T, self.kv, self.hd).transpose(1, 2)
        v = self.v(h).view(B, T, self.kv, self.hd).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        rep = self.h // self.kv
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
        s = (q @ k.transpose(-1, -2)) / math.sqrt(self.hd) + mask
        att = (F.softmax(s, dim=-1) @ v).transpose(1, 2).reshape(B, T, -1)
        x = x + self.o(att)
        h = self.n2(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class Model(nn.Module):
    def __init__(self, a):
        super().__init__()
        self.embed = nn.Embedding(a.vocab, a.dim)
        self.embed.weight.requires_grad_(False)
        self.blocks = nn.ModuleList(Block(a) for _ in range(a.layers))
        self.norm = RMSNorm(a.dim)
        self.head = nn.Linear(a.dim, a.vocab, bias=False)
        self.head.weight.requires_grad_(False)
        hd = a.dim // a.heads
        inv = 1.0 / (10000 ** (torch.arange(0, hd, 2).float() / hd))
        f = torch.outer(torch.arange(a.seq).float(), inv)
        emb = torch.cat((f, f), dim=-1)
        self.register_buffer("cos", emb.cos()[None, None])
        self.register_buffer("sin", emb.sin()[None, None])
        self.register_buffer("mask", torch.full((a.seq, a.seq), float("-inf")).triu(1))

    def forward(self, tok):
        x = self.embed(tok)
        for b in self.blocks:
            x = b(x, self.cos, self.sin, self.mask)
        return self.head(self.norm(x))


def main():
    p = argparse.ArgumentParser()
    for k in ("dim", "layers", "heads", "kv-heads", "ff", "vocab", "seq", "batch", "rank",
              "steps", "threads"):
        p.add_argument("--" + k, type=int, required=True)
    p.add_argument("--bf16", action="store_true",
                   help="frozen base (projections, embedding, head) in bf16, under autocast")
    a = p.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(a.threads)
    m = Model(a)
    if a.bf16:  # as a PyTorch user runs a bf16 checkpoint's frozen base
        for mod in m.modules():
            if isinstance(mod, LoRALinear):
                mod.base.to(torch.bfloat16)
        m.embed.to(torch.bfloat16)
        m.head.to(torch.bfloat16)
    params = [q for q in m.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    data = torch.randint(0, a.vocab, (a.batch, a.seq + 1))

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=a.bf16):
            logits = m(data[:, :-1])
        loss = F.cross_entropy(logits.float().reshape(-1, a.vocab), data[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()

    step()  # warm-up
    t = time.perf_counter()
    for _ in range(a.steps):
        step()
    dt = (time.perf_counter() - t) / a.steps
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"tokens_per_s": a.batch * a.seq / dt, "seconds_per_step": dt,
                      "peak_rss_bytes": rss, "torch": torch.__version__,
                      "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
