#!/usr/bin/env python3
"""The mean next-token loss of a Hugging Face checkpoint on given windows, in float64 PyTorch,
computed by deploy/examples/torch_trainer.py's model (plain PyTorch with transformers'
semantics: RMSNorm, rotate_half RoPE with default, linear or llama3 scaling, grouped-query
attention with Mistral's sliding window, SwiGLU, biases as the checkpoint has them, tied
heads). Independent of fedpeft's C code; test_families compares the two.

usage: hf_loss.py MODEL_DIR TOKENS_JSON   (TOKENS_JSON: [[t0, t1, ...], ...], one row per
window; the loss predicts t[i+1] from t[..i]) — prints the loss."""
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..",
                                "deploy", "examples"))
import torch_trainer  # noqa: E402


def main():
    model_dir, tokens_path = sys.argv[1], sys.argv[2]
    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = json.load(f)
    w = {k: v.double() for k, v in torch_trainer.load_model_weights(model_dir).items()}
    model = torch_trainer.Llama(cfg, w, "cpu")
    with open(tokens_path) as f:
        rows = torch.tensor(json.load(f), dtype=torch.int64)
    x, y = rows[:, :-1], rows[:, 1:]
    with torch.no_grad():
        logits = model.forward(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
    print(repr(loss.item()))


if __name__ == "__main__":
    main()
