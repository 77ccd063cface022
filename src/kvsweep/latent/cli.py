"""The ``kvsweep cache`` subcommand: decode with the latent cache and measure it.

    kvsweep cache --model pythia-70m --random-init --vdproj.rank 320 --context 2048 --new-tokens 128
    kvsweep cache --trial runs/vdproj-r64 --context 512 --new-tokens 64 --out runs/vdproj-r64/cache
    kvsweep cache --model tiny --vdproj.rank 64 --adapter ka_gated --text notes.txt --cache-dtype bfloat16
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..adapters.options import describe
from ..args import add_adapter_args, add_model_args, adapter_specs, model_cfg
from ..config import KvsweepError

DESCRIPTION = (
    "Prefill --context tokens and decode --new-tokens steps with the base and with the adapters on kvsweep's "
    "latent cache (V-DProj caches only its rank-r code; KA its K' and V'). Reports the bytes the cache tensors "
    "really hold, per layer and per token, next to the accounting (the command fails if they differ by a byte), "
    "the logits of every step against the training-time forward, identical greedy output, decode tokens/s and "
    "peak memory. Adapters come from a trained trial (--trial) or are built from --adapter options with their "
    "initial weights."
)


def add_parser(subparsers: "argparse._SubParsersAction") -> argparse.ArgumentParser:
    """Add ``cache`` to the ``kvsweep`` command's subparsers; its ``func`` is ``cmd_cache``."""
    p = subparsers.add_parser("cache", help="decode with the latent KV cache: bytes measured against the accounting, "
                                            "logits against the training-time model, tokens/s", description=DESCRIPTION)
    add_model_args(p)
    g = add_adapter_args(p, "adapters (or --trial)")
    g.add_argument("--trial", default=None, help="a kvsweep train --out folder: its base, adapters and trained weights")
    g = p.add_argument_group("decoding")
    g.add_argument("--context", type=int, default=2048, help="prompt tokens to prefill (default: 2048)")
    g.add_argument("--new-tokens", type=int, default=128, help="decode steps after the prefill (default: 128)")
    g.add_argument("--batch", type=int, default=1, help="sequences decoded together (default: 1)")
    g.add_argument("--cache-dtype", default="float16", choices=("float16", "bfloat16", "float32"), help="dtype the cache stores (default: float16)")
    g.add_argument("--text", default=None, help="a text file whose tokens (repeated as needed) are the prompt; default: random tokens")
    g.add_argument("--seed", type=int, default=0, help="random prompt and adapter init (default: 0)")
    g.add_argument("--no-fold", action="store_true", help="a method whose cached code V decodes linearly (V-DProj): compute A per head and then dense, "
                                                            "instead of folding the decode into dense")
    g.add_argument("--no-check", action="store_true", help="skip the logits check against the training-time forward")
    g.add_argument("--repeats", type=int, default=5, help="timed runs of the base and of the adapted model, interleaved; "
                                                          "speeds are their medians (default: 5)")
    p.add_argument("--out", default=None, help="folder for cache.json")
    p.set_defaults(func=cmd_cache)
    return p


def _adapters_from_args(a: argparse.Namespace):
    specs = adapter_specs(a)
    for s in specs:
        if s.options.calibration_samples > 0:
            raise KvsweepError(f"{describe([s])} initialises from calibration samples: train the adapters (kvsweep train "
                               "with the same options, --epochs 0 at least) and pass the trial folder with --trial")
    return specs


def _prompt(a: argparse.Namespace, base):
    import torch

    from .measure import random_prompt

    if a.context < 1 or a.new_tokens < 1 or a.batch < 1 or a.repeats < 1:
        raise KvsweepError(f"--context, --new-tokens, --batch and --repeats must be >= 1; got {a.context}, {a.new_tokens}, "
                           f"{a.batch}, {a.repeats}")
    if a.text is None:
        return random_prompt(base.config.vocab_size, a.batch, a.context, a.seed)
    path = Path(a.text).expanduser()
    if not path.is_file():
        raise KvsweepError(f"--text: file not found: {a.text}")
    if base.tokenizer is None:
        raise KvsweepError(f"model {base.name} has no tokenizer to read --text with; give one with --tokenizer")
    ids = base.tokenizer(path.read_text(), add_special_tokens=False)["input_ids"]
    if not ids:
        raise KvsweepError(f"--text: {a.text} holds no tokens")
    ids = (ids * (a.context // len(ids) + 1))[: a.context]
    return torch.tensor([ids] * a.batch, dtype=torch.long)


def cmd_cache(a: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from ..adapters import attached, make_adapter
    from ..atomic import write_json
    from ..models import dims, load_base
    from .measure import measure_cache
    from .trial import load_trial

    named = adapter_specs(a)  # --adapter, or a method's own flags
    if a.trial is not None:
        if named:
            raise KvsweepError("give either --trial (the trial's own adapters) or --adapter options, not both")
        base, adapters, config = load_trial(a.trial, device=a.device)
        specs = config["adapters"]
        spec_objs = tuple(ad.spec for ad in adapters)
    else:
        if not named:
            raise KvsweepError("name the adapters with --adapter NAME and their --<method>.<option> flags, or give --trial")
        spec_objs = _adapters_from_args(a)
        base = load_base(model_cfg(a))
        torch.manual_seed(a.seed)
        adapters = [make_adapter(s, dims(base.config)).to(base.device).eval() for s in spec_objs]
        with attached(base.model, adapters):  # an init from the base's weights alone (lowrank's svd) needs no samples
            for ad in adapters:
                ad.calibrate(base.model, np.zeros((0, 1), dtype=np.int64))
        specs = [s.to_dict() for s in spec_objs]
    dtype = next(base.model.parameters()).dtype
    adapters = [ad.to(device=base.device, dtype=dtype) for ad in adapters]  # a float16/bfloat16 base: adapters alike
    prompt = _prompt(a, base)
    if a.context + a.new_tokens > base.max_positions:
        print(f"note: {a.context} + {a.new_tokens} tokens run past the model's {base.max_positions} trained positions "
              "(the rotary embedding extends; the check against the training-time forward still holds)")
    result = measure_cache(base.model, adapters, context=a.context, new_tokens=a.new_tokens, cache_dtype=a.cache_dtype,
                           prompt=prompt, check_logits=not a.no_check, fold=not a.no_fold, repeats=a.repeats,
                           log=print)
    result = {"model": base.name, "trial": a.trial, "adapters": specs, "methods": describe(spec_objs), **result}
    print(format_cache(result))
    if base.tokenizer is not None and a.text is not None:
        print("greedy continuation (adapted): " + repr(base.tokenizer.decode(result["generated"][0])))
    if a.out:
        out = Path(a.out) / "cache.json"
        write_json(out, result)
        print(f"wrote {out}")
    return 0


def format_cache(r: dict) -> str:
    """A short human summary of a ``measure_cache`` result."""
    t = r["timings"]
    names = r.get("methods") or " + ".join(s["name"] for s in r["adapters"])  # cache.json of an earlier kvsweep: names only
    lines = [
        f"{r['model']} with {names}: context {r['context']} + {r['new_tokens']} decode steps, batch {r['batch']}, "
        f"cache {r['cache_dtype']}, compute {r['compute_dtype']} on {r['device']}",
        f"KV cache bytes/token: measured {r['measured_bytes_per_token']:,} = accounted {r['accounted_bytes_per_token']:,}  "
        f"(base {r['base_bytes_per_token']:,}; {100 * r['ratio_to_base']:.1f}% of it)",
        f"  per layer: measured {r['measured_bytes_per_layer']}, accounted {r['accounted_bytes_per_layer']}",
    ]
    if r.get("measured_fixed_bytes"):
        lines.append(f"  fixed (full-precision windows, per sequence): measured {r['measured_fixed_bytes']:,} = declared "
                     f"{r['accounted_fixed_bytes']:,} bytes")
    if "max_abs_logit_diff" in r:
        lines.append(f"logits against the training-time forward, every step: max |diff| {r['max_abs_logit_diff']:.3g}, "
                     f"greedy identical: {'yes' if r['greedy_identical'] else 'NO'} (base: {r['base_max_abs_logit_diff']:.3g}, "
                     f"{'yes' if r['base_greedy_identical'] else 'NO'})")
        if r.get("exact"):
            e = r["exact"]
            lines.append(f"  with the cache at {e['cache_dtype']}: max |diff| {e['max_abs_logit_diff']:.3g}, "
                         f"greedy identical: {'yes' if e['greedy_identical'] else 'NO'}")
    for name in ("base", "adapted"):
        x = t[name]
        mem = (f"peak CUDA memory {x['cuda_max_memory_allocated_bytes'] / 2**20:,.1f} MiB" if "cuda_max_memory_allocated_bytes" in x
               else f"max RSS {x['max_rss_bytes'] / 2**20:,.0f} MiB")
        lines.append(f"{name:>8}: prefill {x['prefill_s']:.3f} s, decode {x['decode_tokens_per_s']:,.1f} tokens/s (medians), "
                     f"cache {x['cache_bytes']:,} bytes, {mem}")
    s, ratio = t["decode_speed_ratio_spread"], t["decode_speed_ratio"]
    lines.append(f"decode speed adapted/base: {ratio:.2f}x (median of {t['repeats']} runs, base and adapted interleaved "
                 f"step by step; min {s['min']:.2f}x, quartiles {s['q1']:.2f}-{s['q3']:.2f}x, max {s['max']:.2f}x)")
    if s["q3"] - s["q1"] > 0.1 * ratio:
        lines.append("  the runs disagree by over 10%: the machine was busy; more --repeats, a quieter machine, "
                     "or on a shared CPU one thread (OMP_NUM_THREADS=1)")
    return "\n".join(lines)
