"""The KA study: the base against KA-Attention (ka_replace), PretrainedMKA V2 (ka_residual) and the gated
variant, over layers and seeds.

    python sweeps/ka.py --smoke-test
    python sweeps/ka.py --model pythia-70m --data wikitext-2 --gpus-per-trial 0.25 --seeds 0,1,2
"""

import sys

from kvsweep.sweepargs import sweep_main


def search_space(dims, smoke: bool, seed_list: list[int]) -> dict:
    variants = ["ka_residual", "ka_gated"] if smoke else ["ka_replace", "ka_residual", "ka_gated"]
    where = ["last"] if smoke else ["last", *[str(i) for i in range(dims.layers - 1)]]
    return {"ka": variants, "ka.layers": where, "schedule": ["lm"], "seed": seed_list}


if __name__ == "__main__":
    sys.exit(sweep_main(__doc__, "ka", search_space))
