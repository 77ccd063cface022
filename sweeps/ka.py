"""The KA study: the base against KA-Attention (ka_replace), PretrainedMKA V2 (ka_residual) and the gated
variant, over layers and seeds.

    python sweeps/ka.py --smoke-test
    python sweeps/ka.py --model pythia-70m --data wikitext-2 --gpus-per-trial 0.25 --seeds 0,1,2
"""

import sys

from kvsweep.config import KvsweepError
from kvsweep.sweepargs import seeds, sweep_cfg, sweep_parser


def search_space(layers: int, smoke: bool, seed_list: list[int]) -> dict:
    variants = ["ka_residual", "ka_gated"] if smoke else ["ka_replace", "ka_residual", "ka_gated"]
    where = ["last"] if smoke else ["last", *[str(i) for i in range(layers - 1)]]
    return {"ka": variants, "ka_layers": where, "schedule": ["lm"], "seed": seed_list}


def main(argv=None) -> int:
    args = sweep_parser(__doc__.splitlines()[0], "ka").parse_args(argv)
    from kvsweep.tune import model_dims, run_sweep

    try:
        sweep = sweep_cfg(args, "ka")
        run_sweep(sweep, search_space(model_dims(sweep).layers, args.smoke_test, seeds(args)))
    except KvsweepError as e:
        print(f"kvsweep: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
