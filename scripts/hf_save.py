#!/usr/bin/env python3
"""Saves a GGUF model as Hugging Face directories with transformers (helper of hf_roundtrip.sh).

usage: hf_save.py GGUF OUT_DIR

Writes OUT_DIR/f32 (one f32 model.safetensors) and OUT_DIR/bf16-sharded (bf16, shards of at
most 100 MB with model.safetensors.index.json), each with config.json and the tokenizer files,
exactly as `save_pretrained` writes them. Prints the library versions and what it wrote.
"""
import json
import os
import sys

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer


def main() -> int:
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    gguf, out = sys.argv[1], sys.argv[2]
    if not os.path.isfile(gguf):
        print(f"hf_save.py: GGUF file {gguf} not found", file=sys.stderr)
        return 2
    folder, name = os.path.split(os.path.abspath(gguf))
    print(f"torch {torch.__version__}, transformers {transformers.__version__}")
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    for dtype, sub, shard in [
        (torch.float32, "f32", None),
        (torch.bfloat16, "bf16-sharded", "100MB"),
    ]:
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
        # The weights are dequantized on load, but transformers >= 5.2x keeps the GGUF
        # "quantizer" on the model and then refuses to save_pretrained it. Drop it (and its
        # config entry) so that the plain tensors are written as a normal checkpoint.
        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer = None
        for cfg in (model.config, getattr(model, "generation_config", None)):
            if cfg is not None and hasattr(cfg, "quantization_config"):
                del cfg.quantization_config
        if getattr(model, "is_quantized", False):
            model.is_quantized = False
        target = os.path.join(out, sub)
        kwargs = {"max_shard_size": shard} if shard else {}
        model.save_pretrained(target, **kwargs)
        tok.save_pretrained(target)
        files = sorted(os.listdir(target))
        sizes = {f: os.path.getsize(os.path.join(target, f)) for f in files}
        print(f"{target}: " + ", ".join(f"{f} ({sizes[f]} B)" for f in files))
        with open(os.path.join(target, "config.json")) as fh:
            cfg = json.load(fh)
        keys = ["model_type", "rope_theta", "rope_parameters", "rope_scaling", "dtype", "torch_dtype",
                "tie_word_embeddings", "head_dim"]
        print("  config: " + json.dumps({k: cfg[k] for k in keys if k in cfg}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
