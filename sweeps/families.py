"""The families study: V-DProj against the field's methods at matched budgets of the base's KV cache.

    python sweeps/families.py --smoke-test                    # tiny preset, 12 trials, 2 epochs, local Ray (about a minute)
    python sweeps/families.py --model pythia-70m --data wikitext-2 --gpus-per-trial 0.25 --seeds 0,1,2
    ray job submit --working-dir . -- python sweeps/families.py --gpus-per-trial 0.25 --seeds 0,1,2

At each budget b of the base's KV bytes/token (75%, 50%, 25%, 12.5%; 50% and 25% in the smoke test):
- vdproj: K and V at rank b*d on every layer, PCA init, trained (rec_to_lm);
- lowrank per head (group 1), grouped (2 and 4 heads) and joint (all heads): K and V at rank b*g*head_size per
  group of g heads; training-free (0 epochs; init from the weights' SVD and from whitened data) and trained;
- quant (KIVI-style, group 32, window 128): K and V at 8, 4 and 2 bits, training-free: 56%, 31% and 19% of the
  base's bytes/token with their fp16 scales and zero points, which count (the window is fixed bytes);
- lowrank+quant: a joint low-rank latent of rank d/2 quantized to 4 and 2 bits (16% and 9%), training-free and
  trained (the rounding passes gradients straight through).
One search space, a union of grids (one per family and setting), run under the Pareto-aware scheduler; the
report puts every family on one front, and its leaderboard gives each family's best within each budget.
"""

import sys

from kvsweep.sweepargs import sweep_main

BUDGETS = (0.75, 0.5, 0.25, 0.125)
SMOKE_BUDGETS = (0.5, 0.25)


def lowrank_rank(dims, budget: float, group: int) -> int:
    """The rank per group of ``group`` heads that holds ``budget`` of K and of V: budget x group x head size."""
    return max(1, round(budget * group * dims.head_size))


def search_space(dims, smoke: bool, seed_list: list[int]) -> list[dict]:
    budgets = SMOKE_BUDGETS if smoke else BUDGETS
    groups = [1, dims.heads] if smoke else sorted({g for g in (1, 2, 4, dims.heads) if dims.heads % g == 0})
    seeds = {"seed": seed_list}
    parts = [{"vdproj.rank": [max(1, round(b * dims.hidden)) for b in budgets], "vdproj.target": ["kv"], "vdproj.init": ["pca"],
              "schedule": ["rec_to_lm"], **seeds}]
    for g in groups:
        for b in budgets:  # one part per budget: K and V at the same rank
            r = lowrank_rank(dims, b, g)
            lowrank = {"lowrank.group": [g], "lowrank.k_rank": [r], "lowrank.v_rank": [r]}
            parts.append({**lowrank, "lowrank.init": ["svd"] if smoke else ["svd", "whitened"], "epochs": [0], **seeds})
            parts.append({**lowrank, "lowrank.init": ["whitened"], "schedule": ["rec_to_lm"], **seeds})
    parts.append({"quant": ["quant"], "quant.bits": [4] if smoke else [8, 4, 2], "epochs": [0], **seeds})
    r = lowrank_rank(dims, 0.5, dims.heads)
    latent = {"lowrank.group": [dims.heads], "lowrank.k_rank": [r], "lowrank.v_rank": [r], "lowrank.init": ["whitened"],
              "quant": ["quant"], "quant.bits": [4] if smoke else [4, 2]}
    parts.append({**latent, "epochs": [0], **seeds})
    if not smoke:
        parts.append({**latent, "schedule": ["rec_to_lm"], **seeds})
    return parts


if __name__ == "__main__":
    sys.exit(sweep_main(__doc__, "families", search_space))
