"""The V-DProj study: compressed width x loss schedule x init x KA variant x seed, pruned by multi-objective ASHA.

    python sweeps/vdproj.py --smoke-test                      # tiny preset, 4 trials, 2 epochs, local Ray
    python sweeps/vdproj.py --model pythia-70m --data wikitext-2 --gpus-per-trial 0.25 --storage s3://bucket/kvsweep
    ray job submit --working-dir . -- python sweeps/vdproj.py --gpus-per-trial 0.25
"""

import sys

from kvsweep.sweepargs import sweep_main


def search_space(dims, smoke: bool, seed_list: list[int]) -> dict:
    hidden = dims.hidden
    if smoke:
        return {"vdproj.rank": [hidden // 4, hidden // 2], "vdproj.init": ["random", "pca"], "schedule": ["rec_to_lm"], "seed": seed_list}
    step = max(1, hidden // 8)  # Pythia-70M: 64, 128, ..., 512
    return {
        "vdproj.rank": list(range(step, hidden + 1, step)),
        "schedule": ["lm", "rec_to_lm", "rec_to_lm_cosine", "rec_to_lm_step"],
        "kl_weight": [0.0, 1.0],
        "vdproj.init": ["random", "pca"],
        "ka": ["none", "ka_residual", "ka_gated", "ka_replace"],
        "seed": seed_list,
    }


if __name__ == "__main__":
    sys.exit(sweep_main(__doc__, "vdproj", search_space))
