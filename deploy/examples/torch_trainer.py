#!/usr/bin/env python3
"""fedpeft external trainer: a working example of the contract, in plain PyTorch.

fedpeft-client (train.trainer = external) runs this once per task with the task directory as
its last argument (see `man fedpeft-client` and deploy/examples/README.md):

    trainer_command = python3 /usr/share/doc/fedpeft-client/examples/torch_trainer.py

It reads task.json, the base model (config.json and safetensors, read here without any
library beyond PyTorch), the site's data, and the starting adapter in start/ (plus fold/, the
global update, for restart strategies); trains the LoRA factors with AdamW; writes out/ (an
HF PEFT adapter), result.json and, as it goes, progress.json.

Needs only Debian's python3-torch. It runs Llama-family decoders (RMSNorm, RoPE,
grouped-query attention, SwiGLU, optional attention biases, tied or untied head) on the CPU
or one GPU. Tokenizers: byte-level ones ("bytes", or a tokenizer.json without merges, as the
demo model's); others through the `tokenizers` package when it is installed. Data follows
fedpeft's rules: .jsonl with {"text"} or {"prompt", "completion"} (loss on the completion),
or text with documents between "%" lines (else blank lines). The held-out loss is measured
exactly as fedpeft's built-in trainer measures it (windows that predict every target token
once: consecutive for text, whole documents for prompt/completion data), so both kinds of
sites report comparable numbers; training windows start where documents start for
prompt/completion data, anywhere for text, as fedpeft's do.
"""
import json
import math
import os
import random
import re
import struct
import sys
import time

import torch
import torch.nn.functional as F

DTYPES = {"F32": (torch.float32, 4), "F16": (torch.float16, 2), "BF16": (None, 2)}


# ---- safetensors, by hand -------------------------------------------------------------------

def read_safetensors(path):
    """Every tensor of a safetensors file, as float32."""
    with open(path, "rb") as f:
        data = f.read()
    (hlen,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + hlen])
    base = 8 + hlen
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in DTYPES:
            raise ValueError(f"{path}: {name}: dtype {info['dtype']} is not supported")
        b, e = info["data_offsets"]
        raw = bytearray(data[base + b:base + e])
        if info["dtype"] == "BF16":  # the upper half of a float32
            t = (torch.frombuffer(raw, dtype=torch.int16).to(torch.int32) << 16).view(torch.float32)
        else:
            t = torch.frombuffer(raw, dtype=DTYPES[info["dtype"]][0]).to(torch.float32)
        out[name] = t.reshape(info["shape"]).clone()
    return out


def write_safetensors(path, tensors):
    """F32 tensors to a safetensors file, written aside and renamed into place."""
    header, blobs, off = {}, [], 0
    for name in sorted(tensors):
        b = tensors[name].detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
        header[name] = {"dtype": "F32", "shape": list(tensors[name].shape),
                        "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h)
        for b in blobs:
            f.write(b)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_model_weights(model_dir):
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(index):  # sharded checkpoints
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        w = {}
        for name in files:
            w.update(read_safetensors(os.path.join(model_dir, name)))
        return w
    return read_safetensors(os.path.join(model_dir, "model.safetensors"))


# ---- tokenizing, as fedpeft does --------------------------------------------------------------

def bytes_to_unicode():
    """GPT-2's reversible map of bytes to printable characters (ByteLevel tokenizers)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def make_tokenizer(task):
    spec = task.get("tokenizer") or ""
    if spec == "bytes":
        return lambda text: list(text.encode())
    path = spec or os.path.join(task["model_dir"], "tokenizer.json")
    with open(path) as f:
        tj = json.load(f)
    model = tj.get("model", {})
    pre = tj.get("pre_tokenizer") or {}
    if model.get("type") == "BPE" and not model.get("merges") and pre.get("type") == "ByteLevel" \
            and not pre.get("add_prefix_space"):
        vocab, b2u = model["vocab"], bytes_to_unicode()
        ids = [vocab[b2u[b]] for b in range(256)]
        return lambda text: [ids[b] for b in text.encode()]
    try:
        from tokenizers import Tokenizer  # optional: any Hugging Face tokenizer
    except ImportError:
        sys.exit(f"{path}: only byte-level tokenizers are built in; install the `tokenizers` "
                 "package for this one")
    tok = Tokenizer.from_file(path)
    return lambda text: tok.encode(text, add_special_tokens=False).ids


def split_text(text):
    """Documents of a text file: between "%" lines when the file has one, else blank lines."""
    lines = text.split("\n")
    fortune = any(l in ("%", "%\r") for l in lines)
    docs, cur = [], []
    for l in lines:
        sep = l in ("%", "%\r") if fortune else l in ("", "\r")
        if sep:
            docs.append("\n".join(cur))
            cur = []
        else:
            cur.append(l)
    docs.append("\n".join(cur))
    out = []
    for d in docs:
        d = d.rstrip("\n\r")
        if d:
            out.append(d)
    return out


def load_documents(files, encode):
    """[(prompt_ids, completion_ids)] of every document of files."""
    docs = []
    for path in files:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        if path.endswith(".jsonl"):
            for n, line in enumerate(text.split("\n"), 1):
                if not line.strip():
                    continue
                o = json.loads(line)
                if "text" in o:
                    docs.append(([], encode(o["text"])))
                elif "prompt" in o and "completion" in o:
                    docs.append((encode(o["prompt"]), encode(o["completion"])))
                elif "input_ids" in o:
                    docs.append(([], list(o["input_ids"])))
                else:
                    sys.exit(f"{path}:{n}: not a text, prompt/completion or input_ids line")
        else:
            docs.extend(([], encode(d)) for d in split_text(text))
    return docs


def stream(docs, bos, eos):
    """One token stream, its "is a target" flags ([bos] prompt completion [eos]), where each
    document ends, and whether any has a prompt (fedpeft's "prompted" data)."""
    tok, tgt, ends = [], [], []
    prompted = False
    for prompt, comp in docs:
        if bos is not None and bos >= 0:
            tok.append(bos)
            tgt.append(0)
        tok += prompt
        tgt += [0] * len(prompt)
        tok += comp
        tgt += [1] * len(comp)
        if eos is not None and eos >= 0:
            tok.append(eos)
            tgt.append(1)
        ends.append(len(tok))
        prompted = prompted or bool(prompt)
    return (torch.tensor(tok, dtype=torch.long), torch.tensor(tgt, dtype=torch.bool), ends,
            prompted)


def window(tok, tgt, start, T, length=None):
    """Inputs [start, start + length) and their next-token targets, padded to T."""
    n = tok.numel()
    length = T if length is None else length
    idx = torch.arange(start, start + T)
    inside = (idx < n) & (idx < start + length)
    pad = tok[min(start + length, n - 1)]
    x = torch.where(inside, tok[idx.clamp(max=n - 1)], pad)
    nxt = idx + 1
    ok = inside & (nxt < n) & tgt[nxt.clamp(max=n - 1)]
    y = torch.where(ok, tok[nxt.clamp(max=n - 1)], torch.full_like(idx, -1))
    return x, y


def eval_windows(n, ends, T, prompted):
    """fedpeft's evaluation windows as (start, length): consecutive windows of T for text;
    for prompted data as many whole documents as fit, a longer one in pieces of T."""
    last, at, k, out = n - 1, 0, 0, []
    while at < last:
        lim = min(at + T, last)
        end = lim
        if prompted:
            best, j = 0, k
            while j < len(ends) and min(ends[j], last) <= lim:
                best = min(ends[j], last)
                j += 1
            end = best if best > at else lim
        out.append((at, end - at))
        at = end
        while k < len(ends) and ends[k] <= at:
            k += 1
    return out


# ---- the model ------------------------------------------------------------------------------

def rope_inv_freq(cfg, hd):
    """RoPE's inverse frequencies as transformers' modeling_rope_utils computes them: default,
    linear and llama3 scaling, from rope_scaling or (transformers 5) rope_parameters."""
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or params
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    inv = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "linear":
        inv = inv / scaling["factor"]
    elif kind == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old / low, inv / factor, inv)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old / high) * ~(wavelen > old / low)
        inv = torch.where(medium, smoothed, scaled)
    elif kind != "default":
        raise ValueError(f"rope_type {kind!r} is not supported")
    return inv


def sliding_window(cfg):
    """The attention window: Mistral's sliding_window on every layer; none for Llama, nor for
    Qwen2 unless use_sliding_window (which windows only some layers: refused)."""
    if cfg.get("model_type") == "mistral":  # MistralConfig: 4096 when absent, none when null
        return (cfg["sliding_window"] or 0) if "sliding_window" in cfg else 4096
    if cfg.get("use_sliding_window"):
        raise ValueError("use_sliding_window is not supported")
    return 0


def first_eos(cfg):
    """eos_token_id, or the first of its list (Llama 3.x Instruct): the token ending documents."""
    eos = cfg.get("eos_token_id")
    return eos[0] if isinstance(eos, list) else eos


class Llama:
    """A Llama-family decoder over frozen weights, with LoRA factors on named projections."""

    def __init__(self, cfg, w, device):
        self.c = cfg
        self.dim = cfg["hidden_size"]
        self.nh = cfg["num_attention_heads"]
        # each family's default, as its transformers config class has it
        kv_default = {"mistral": 8, "qwen2": 32}.get(cfg.get("model_type"), self.nh)
        self.nkv = cfg.get("num_key_value_heads") or kv_default
        self.hd = cfg.get("head_dim") or self.dim // self.nh
        self.eps = cfg.get("rms_norm_eps", 1e-6)
        self.layers = cfg["num_hidden_layers"]
        self.w = {k: v.to(device) for k, v in w.items()}
        if "lm_head.weight" not in self.w:  # tied embeddings
            self.w["lm_head.weight"] = self.w["model.embed_tokens.weight"]
        self.inv_freq = rope_inv_freq(cfg, self.hd).to(device)
        self.window = sliding_window(cfg)
        self.lora = {}  # module -> (A, B, scale)

    def linear(self, x, name):
        y = x @ self.w[name + ".weight"].t()
        if name + ".bias" in self.w:
            y = y + self.w[name + ".bias"]
        if name in self.lora:
            A, B, s = self.lora[name]
            y = y + (x @ A.t()) @ B.t() * s
        return y

    def norm(self, x, name):
        v = x.pow(2).mean(-1, keepdim=True)
        return x * torch.rsqrt(v + self.eps) * self.w[name + ".weight"]

    def rope(self, x, T):
        t = torch.arange(T, device=x.device, dtype=torch.float32)
        f = torch.outer(t, self.inv_freq)
        emb = torch.cat((f, f), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        h = x.shape[-1] // 2
        rot = torch.cat((-x[..., h:], x[..., :h]), dim=-1)
        return x * cos + rot * sin

    def forward(self, tokens):
        B, T = tokens.shape
        x = self.w["model.embed_tokens.weight"][tokens]
        mask = torch.full((T, T), float("-inf"), device=x.device).triu(1)
        if self.window:  # transformers: query q sees key kv when q - window < kv <= q
            pos = torch.arange(T, device=x.device)
            mask = mask.masked_fill(pos[None, :] <= pos[:, None] - self.window, float("-inf"))
        for i in range(self.layers):
            p = f"model.layers.{i}."
            h = self.norm(x, p + "input_layernorm")
            q = self.linear(h, p + "self_attn.q_proj").view(B, T, self.nh, self.hd).transpose(1, 2)
            k = self.linear(h, p + "self_attn.k_proj").view(B, T, self.nkv, self.hd).transpose(1, 2)
            v = self.linear(h, p + "self_attn.v_proj").view(B, T, self.nkv, self.hd).transpose(1, 2)
            q, k = self.rope(q, T), self.rope(k, T)
            if self.nkv != self.nh:
                k = k.repeat_interleave(self.nh // self.nkv, dim=1)
                v = v.repeat_interleave(self.nh // self.nkv, dim=1)
            a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(self.hd) + mask, dim=-1) @ v
            x = x + self.linear(a.transpose(1, 2).reshape(B, T, self.nh * self.hd),
                                p + "self_attn.o_proj")
            h = self.norm(x, p + "post_attention_layernorm")
            g = self.linear(h, p + "mlp.gate_proj")
            u = self.linear(h, p + "mlp.up_proj")
            x = x + self.linear(F.silu(g) * u, p + "mlp.down_proj")
        return self.linear(self.norm(x, "model.norm"), "lm_head")


def pattern_value(pattern, module, default):
    """PEFT's rank_pattern / alpha_pattern lookup (get_pattern_key, PEFT 0.15): the first key K
    for which (.*\\.)?(K)$ matches the module's name from its start, else the default."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def adapter_factors(path, cfg):
    """{module: (A, B)} of an HF PEFT directory, and its scale per module."""
    t = read_safetensors(os.path.join(path, "adapter_model.safetensors"))
    with open(os.path.join(path, "adapter_config.json")) as f:
        ac = json.load(f)
    mods = {}
    for key, v in t.items():
        if ".lora_" not in key:  # a tensor trained in full (a ViT's head): not a factor
            continue
        mod = key[len("base_model.model."):].rsplit(".lora_", 1)[0]
        which = "A" if ".lora_A." in key else "B"
        mods.setdefault(mod, {})[which] = v
    out = {}
    for mod, ab in mods.items():
        r = ab["A"].shape[0]
        alpha = pattern_value(ac.get("alpha_pattern") or {}, mod, ac["lora_alpha"])
        s = alpha / math.sqrt(r) if ac.get("use_rslora") else alpha / r
        out[mod] = (ab["A"], ab["B"], s)
    return out, ac


def evaluate(model, data, T, batch):
    """Mean loss over every target token, in fedpeft's evaluation windows."""
    tok, tgt, ends, prompted = data
    wins = eval_windows(tok.numel(), ends, T, prompted) if tok.numel() >= 2 else []
    total, count = 0.0, 0
    with torch.no_grad():
        for w0 in range(0, len(wins), batch):
            xs, ys = zip(*(window(tok, tgt, a, T, n) for a, n in wins[w0:w0 + batch]))
            x, y = torch.stack(xs), torch.stack(ys)
            logits = model.forward(x.to(DEVICE))
            y = y.to(DEVICE)
            total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1),
                                     ignore_index=-1, reduction="sum").item()
            count += int((y >= 0).sum())
    return total / count if count else float("nan")


def open_task(kind, other):
    """The task directory (the last argument) becomes the working directory: task.json,
    refused unless its "task" is kind (other: the example that takes the rest), the model's
    config.json, a random generator seeded by the task, and the start time."""
    os.chdir(sys.argv[-1])
    with open("task.json") as f:
        task = json.load(f)
    if task.get("task", "causal-lm") != kind:
        sys.exit(f"task {task['task']!r}: this trainer takes {kind} tasks ({other} takes the "
                 "others)")
    torch.manual_seed(task["seed"] & 0x7fffffff)
    with open(os.path.join(task["model_dir"], "config.json")) as f:
        cfg = json.load(f)
    return task, cfg, random.Random(task["seed"]), time.time()


def fold_in(weights, task, cfg):
    """Restart strategies: the global update (fold/) joins the base weights, W += s·B·A."""
    if task.get("fold"):
        fold, _ = adapter_factors(task["fold"], cfg)
        for mod, (A, B, s) in fold.items():
            weights[mod + ".weight"] += s * (B @ A)


def fit(params, h, steps, batch_loss):
    """AdamW (task.json's lr and weight decay) under a cosine schedule, gradients clipped to
    norm 1, FedProx's mu/2 ||theta - theta_0||^2 when prox_mu > 0; batch_loss() is one random
    batch's loss. progress.json and a line of output each step. The last batch's loss."""
    opt = torch.optim.AdamW(params, lr=h["lr"] or 1e-3, weight_decay=h["weight_decay"],
                            betas=(0.9, 0.999), eps=1e-8)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    mu = float(h.get("prox_mu") or 0.0)
    anchors = [p.detach().clone() for p in params] if mu > 0 else []
    loss_v = float("nan")
    for step in range(1, steps + 1):
        loss = batch_loss()
        objective = loss
        if mu > 0:
            objective = loss + 0.5 * mu * sum(((p - a) ** 2).sum() for p, a in zip(params, anchors))
        opt.zero_grad()
        objective.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        loss_v = loss.item()
        write_json("progress.json", {"step": step, "steps": steps, "loss": loss_v})
        print(f"step {step}/{steps} loss {loss_v:.4f}", flush=True)
    return loss_v


def write_output(lora, adapter_config, result, whole=None):
    """out/ as HF PEFT (the factors of lora {module: (A, B, s)}, and whole {name: tensor}
    trained in full, keyed under base_model.model.) and result.json."""
    os.makedirs("out", exist_ok=True)
    tensors = {f"base_model.model.{k}": v for k, v in (whole or {}).items()}
    for mod, (A, B, s) in lora.items():
        tensors[f"base_model.model.{mod}.lora_A.weight"] = A
        tensors[f"base_model.model.{mod}.lora_B.weight"] = B
    write_safetensors(os.path.join("out", "adapter_model.safetensors"), tensors)
    write_json(os.path.join("out", "adapter_config.json"), adapter_config)
    write_json("result.json", result)


def write_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def main():
    task, cfg, rng, t0 = open_task("causal-lm", "torch_vit_trainer.py")
    h = task["hyper"]
    weights = load_model_weights(task["model_dir"])
    fold_in(weights, task, cfg)
    model = Llama(cfg, weights, DEVICE)
    start, adapter_config = adapter_factors(task["start"], cfg)
    params = []
    for mod, (A, B, s) in start.items():
        A = A.to(DEVICE).requires_grad_(not task["freeze_a"])
        B = B.to(DEVICE).requires_grad_(True)
        model.lora[mod] = (A, B, s)
        params += [B] if task["freeze_a"] else [A, B]

    encode = make_tokenizer(task)
    bos, eos = cfg.get("bos_token_id"), first_eos(cfg)
    docs = load_documents(task["data_files"], encode)
    if task.get("eval_files"):
        held_docs = load_documents(task["eval_files"], encode)
    else:  # hold out a fraction of the documents (this trainer's own split)
        r = random.Random(task.get("split_seed", 1))
        order = list(range(len(docs)))
        r.shuffle(order)
        # as many as fedpeft holds out (its rounding: at least one, never all), so the
        # documents trained on never exceed the count the daemon checks "samples" against
        n, frac = len(docs), task.get("eval_fraction", 0.1)
        k = min(max(int(frac * n + 0.5), 1 if frac > 0 and n >= 2 else 0), max(n - 1, 0))
        held_docs = [docs[i] for i in order[:k]]
        docs = [docs[i] for i in order[k:]]
    train = stream(docs, bos, eos)
    tok, tgt, ends, prompted = train
    held = stream(held_docs, bos, eos) if held_docs else None
    T = min(h["seq_len"] or 128, cfg.get("max_position_embeddings", 1 << 30))
    Bsz = h["batch"] or 8
    steps = max(1, min(h["steps"], task.get("max_steps", h["steps"])))
    before = evaluate(model, held, T, Bsz) if held is not None else float("nan")

    span = max(1, tok.numel() - T)
    starts = [0] + ends[:-1]  # prompted data: windows start where documents start

    def batch_loss():
        xs, ys = zip(*(window(tok, tgt, starts[rng.randrange(len(starts))] if prompted
                              else rng.randrange(span), T) for _ in range(Bsz)))
        x, y = torch.stack(xs).to(DEVICE), torch.stack(ys).to(DEVICE)
        logits = model.forward(x)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1),
                               ignore_index=-1)

    loss_v = fit(params, h, steps, batch_loss)
    after = evaluate(model, held, T, Bsz) if held is not None else float("nan")

    result = {"samples": len(docs), "train_loss": loss_v, "seconds": time.time() - t0}
    if held is not None:
        result.update(eval_loss_before=before, eval_loss_after=after)
    write_output(model.lora, adapter_config, result)
    print(f"trained {steps} steps on {len(docs)} documents: held-out loss "
          f"{before:.4f} -> {after:.4f}", flush=True)


if __name__ == "__main__":
    main()
