#!/usr/bin/env python3
"""Logits of a Hugging Face ViTForImageClassification checkpoint with a PEFT LoRA adapter, in
float32 PyTorch written from the model's definition (transformers' modeling_vit semantics:
conv patch embedding, CLS token, position embeddings, pre-LayerNorm blocks, exact GELU, the
classifier on the final LayerNorm's CLS token) — independent of fedpeft's C code; test_vit
compares the two. The adapter is merged into the weights (W + s·B·A), not applied as fedpeft
applies it.

A classifier in the adapter (PEFT's modules_to_save: base_model.model.classifier.weight and
.bias) replaces the checkpoint's, as PEFT's ModulesToSaveWrapper does.

usage: torch_vit.py MODEL_DIR ADAPTER_DIR PIXELS_RAW B [--write-peft] — PIXELS_RAW: B × C × S
× S float32; prints the B × K logits as JSON. --write-peft first writes ADAPTER_DIR the way
PEFT saves a LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
modules_to_save=["classifier"]) model: random factors and a random head."""
import json
import math
import os
import re
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..",
                                "deploy", "examples"))
import torch_trainer  # noqa: E402  (its safetensors reader)


def write_peft(model_dir, adapter_dir, cfg):
    g = torch.Generator().manual_seed(11)
    D, K = cfg["hidden_size"], len(cfg["id2label"])
    t = {}
    for l in range(cfg["num_hidden_layers"]):
        for n in ("query", "value"):
            k = f"base_model.model.vit.encoder.layer.{l}.attention.attention.{n}"
            t[k + ".lora_A.weight"] = 0.3 * torch.randn(4, D, generator=g)
            t[k + ".lora_B.weight"] = 0.2 * torch.randn(D, 4, generator=g)
    t["base_model.model.classifier.weight"] = 0.3 * torch.randn(K, D, generator=g)
    t["base_model.model.classifier.bias"] = 0.1 * torch.randn(K, generator=g)
    os.makedirs(adapter_dir, exist_ok=True)
    torch_trainer.write_safetensors(os.path.join(adapter_dir, "adapter_model.safetensors"), t)
    conf = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["query", "value"],
            "modules_to_save": ["classifier"], "lora_dropout": 0.0, "bias": "none",
            "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "task_type": None,
            "inference_mode": True, "base_model_name_or_path": model_dir,
            "rank_pattern": {}, "alpha_pattern": {}}
    with open(os.path.join(adapter_dir, "adapter_config.json"), "w") as f:
        json.dump(conf, f, indent=2)


def main():
    model_dir, adapter_dir, pixels_path, b = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = json.load(f)
    if "--write-peft" in sys.argv[5:]:
        write_peft(model_dir, adapter_dir, cfg)
    w = torch_trainer.read_safetensors(os.path.join(model_dir, "model.safetensors"))
    with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
        acfg = json.load(f)
    ad = torch_trainer.read_safetensors(os.path.join(adapter_dir, "adapter_model.safetensors"))
    for module in acfg.get("modules_to_save") or []:  # the trained copy replaces the module
        for key, v in ad.items():
            if key.startswith(f"base_model.model.{module}."):
                w[key[len("base_model.model."):]] = v
    for key, a in ad.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module = key[len("base_model.model."):-len(".lora_A.weight")]
        bmat = ad[key.replace("lora_A", "lora_B")]
        r = a.shape[0]
        alpha = acfg["lora_alpha"]  # PEFT ≥ 0.15's rule: a key matches a module's path suffix
        for pat, val in (acfg.get("alpha_pattern") or {}).items():
            if re.fullmatch(r"(.*\.)?(" + pat + r")", module):
                alpha = val
        s = alpha / math.sqrt(r) if acfg.get("use_rslora") else alpha / r
        w[module + ".weight"] = w[module + ".weight"] + s * (bmat @ a)
    D, H, C, S, P = (cfg[k] for k in ("hidden_size", "num_attention_heads", "num_channels",
                                      "image_size", "patch_size"))
    eps = cfg["layer_norm_eps"]
    x = torch.frombuffer(bytearray(open(pixels_path, "rb").read()), dtype=torch.float32)
    x = x.reshape(b, C, S, S)
    e = F.conv2d(x, w["vit.embeddings.patch_embeddings.projection.weight"],
                 w["vit.embeddings.patch_embeddings.projection.bias"], stride=P)
    e = e.flatten(2).transpose(1, 2)  # b × Np × D
    h = torch.cat([w["vit.embeddings.cls_token"].expand(b, -1, -1), e], dim=1)
    h = h + w["vit.embeddings.position_embeddings"]
    T, hd = h.shape[1], D // H

    def lin(x, name):
        bias = w.get(name + ".bias")
        return F.linear(x, w[name + ".weight"], bias)

    for l in range(cfg["num_hidden_layers"]):
        p = f"vit.encoder.layer.{l}."
        a = F.layer_norm(h, (D,), w[p + "layernorm_before.weight"], w[p + "layernorm_before.bias"], eps)
        q, k, v = (lin(a, p + "attention.attention." + n).view(b, T, H, hd).transpose(1, 2)
                   for n in ("query", "key", "value"))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1) @ v
        h = h + lin(att.transpose(1, 2).reshape(b, T, D), p + "attention.output.dense")
        m = F.layer_norm(h, (D,), w[p + "layernorm_after.weight"], w[p + "layernorm_after.bias"], eps)
        h = h + lin(F.gelu(lin(m, p + "intermediate.dense")), p + "output.dense")
    z = F.layer_norm(h[:, 0], (D,), w["vit.layernorm.weight"], w["vit.layernorm.bias"], eps)
    print(json.dumps(lin(z, "classifier").tolist()))


main()
