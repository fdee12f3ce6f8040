"""Write a random-weight OPT checkpoint of a published size with `save_pretrained` (fp16 safetensors).

    python benchmarks/_checkpoint.py --model opt-1.3b --out /tmp/flexwrangle-bench/opt-1.3b-fp16

Both Accelerate and the engine then read the same real file (Accelerate cannot run dummy weights).
Idempotent: an existing complete checkpoint of the same shape is kept.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

SHAPES = {  # hidden, layers, heads, ffn (as engine.config.OPT_SIZES)
    "opt-125m": (768, 12, 12, 3072),
    "opt-1.3b": (2048, 24, 32, 8192), "opt-2.7b": (2560, 32, 32, 10240),
}
MARKER = "flexwrangle_bench.json"


def ensure(model: str, out: Path) -> Path:
    """The checkpoint directory, written now unless a complete one is already there."""
    out = Path(out)
    want = {"model": model, "dtype": "float16", "seed": 0}
    marker = out / MARKER
    if marker.exists() and json.loads(marker.read_text()) == want:
        return out
    import torch
    from transformers import OPTConfig, OPTForCausalLM
    h, layers, heads, ffn = SHAPES[model]
    cfg = OPTConfig(hidden_size=h, num_hidden_layers=layers, num_attention_heads=heads, ffn_dim=ffn,
                    vocab_size=50272, max_position_embeddings=2048, word_embed_proj_dim=h,
                    do_layer_norm_before=True, pad_token_id=1, bos_token_id=2, eos_token_id=2)
    torch.manual_seed(0)
    m = OPTForCausalLM(cfg).to(torch.float16)
    out.mkdir(parents=True, exist_ok=True)
    m.save_pretrained(out)
    marker.write_text(json.dumps(want))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=sorted(SHAPES), required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    print(ensure(args.model, Path(args.out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
