#!/usr/bin/env python3
"""HF PEFT's own matching code, as its source has it, run on an adapter fedpeft wrote: every
module must get the rank of its tensors from rank_pattern, and the alpha fedpeft says it has
from alpha_pattern, under PEFT 0.14 and under PEFT 0.15+ (which changed the rule, PEFT #2419),
and every module must be a target (check_target_module_exists). No PEFT install is needed:
the few lines that decide are transcribed below, from the tagged sources.

usage: peft_patterns.py ADAPTER_DIR ALPHAS_JSON   (ALPHAS_JSON: {module: alpha})
prints one line per PEFT version; exits 1 on the first module that would get another value."""
import json
import os
import re
import struct
import sys


# peft v0.14.0, src/peft/utils/other.py (called by tuners/lora/model.py _create_and_replace
# with the module's name in the base model, e.g. "model.layers.0.mlp.down_proj"):
def get_pattern_key_014(pattern_keys, key_to_match):
    return next(filter(lambda key: re.match(rf".*\.{key}$", key_to_match), pattern_keys),
                key_to_match)


# peft v0.15.0 and later, src/peft/utils/other.py:
def get_pattern_key_015(pattern_keys, key_to_match):
    for key in pattern_keys:
        match = re.match(rf"(.*\.)?({key})$", key_to_match)
        if not match:
            continue
        return key
    return key_to_match


# peft, src/peft/tuners/tuners_utils.py check_target_module_exists (both versions):
def is_target(target_modules, key):
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, key) is not None
    if key in target_modules:
        return True
    return any(key.endswith(f".{target_key}") for target_key in target_modules)


def tensor_shapes(path):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return {k: v["shape"] for k, v in header.items() if k != "__metadata__"}


def main():
    adapter, alphas_path = sys.argv[1], sys.argv[2]
    with open(os.path.join(adapter, "adapter_config.json")) as f:
        cfg = json.load(f)
    with open(alphas_path) as f:
        alphas = json.load(f)
    shapes = tensor_shapes(os.path.join(adapter, "adapter_model.safetensors"))
    ranks = {k[len("base_model.model."):-len(".lora_A.weight")]: s[0]
             for k, s in shapes.items() if k.endswith(".lora_A.weight")}
    rank_pattern, alpha_pattern = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    bad = 0
    for version, get_pattern_key in (("0.14", get_pattern_key_014), ("0.15", get_pattern_key_015)):
        for module, rank in sorted(ranks.items()):
            if not is_target(cfg["target_modules"], module):
                print(f"PEFT {version}: {module} is not among target_modules")
                bad += 1
            r = rank_pattern.get(get_pattern_key(rank_pattern.keys(), module), cfg["r"])
            a = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), module), cfg["lora_alpha"])
            if r != rank or abs(a - alphas[module]) > 1e-12 * abs(alphas[module]):
                print(f"PEFT {version}: {module} gets r {r}, alpha {a}; "
                      f"its tensors say r {rank}, fedpeft alpha {alphas[module]}")
                bad += 1
        print(f"PEFT {version}: {len(ranks)} modules, {len(rank_pattern)} rank and "
              f"{len(alpha_pattern)} alpha pattern keys")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
