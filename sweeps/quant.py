"""The KIVI study: the base against quantized KV caches (K per channel, V per token, a full-precision window of
the most recent tokens) over bits, group size, window and what is quantized. Training-free: each trial is its
epoch 0 (no weights), evaluated on validation and test; the cache's bytes are measured.

    python sweeps/quant.py --smoke-test
    python sweeps/quant.py --model pythia-70m --data wikitext-2 --gpus-per-trial 0.25
"""

import sys

from kvsweep.sweepargs import sweep_main


def search_space(dims, smoke: bool, seed_list: list[int]) -> dict:
    if smoke:
        group = max(1, dims.hidden // 8)
        return {"quant.bits": [2, 4], "quant.group": [group], "quant.window": [0, group], "schedule": ["lm"], "seed": seed_list[:1]}
    return {
        "quant.bits": [2, 4, 8],
        "quant.group": [32, 64, 128],
        "quant.window": [0, 128],
        "quant.target": ["kv", "k", "v"],
        "schedule": ["lm"],
        "seed": seed_list[:1],  # nothing is trained: seeds would repeat one evaluation
    }


if __name__ == "__main__":
    sys.exit(sweep_main(__doc__, "quant", search_space))
