"""Latent-cache decoding on Pythia-70M's architecture (random weights): cache bytes/token and decode speed.

    python benchmarks/decode.py [--context 2048] [--new-tokens 128] [--ranks 320,256,128] [--repeats 3]
                                [--device auto] [--dtype float32] [--cache-dtype float16] [--threads N]
                                [--lowrank 1:32,2:64,8:256]
    python benchmarks/decode.py --budgets 0.75,0.5,0.25,0.125 --json decode.json   # each family at each budget

For the base and V-DProj (target v, every layer) at each rank: the bytes per token the cache tensors
hold (checked against kvsweep.kvcache's accounting; the script fails if they differ), decode tokens/s
(from the median time of one decode step over all repeats, rows interleaved, so that a noisy machine
slows all rows alike) and both as ratios to
the base. V-DProj runs with `up` folded into `dense` (fold) and with A computed per head (per-head).
With ``--lowrank GROUP:RANK,...``, lowrank (heads per group, rank per group, every layer) compressing V
alone and K+V at that rank: their difference in step time is what restoring and rotating the keys from
their code costs per step (the V-only row reads rotated keys from the cache as the base does).
A last row times transformers' own decoding loop (DynamicCache, the model's dtype) as a reference
for the speed of kvsweep's loop. Runs on CPU or CUDA (--device cuda, e.g. --dtype float16).

With --budgets, the rows are instead each registered family's method at each share of the base's KV
bytes/token (``family_rows``: V-DProj and lowrank at the ranks that hold the budget, quant at the bits that
come nearest it, quant on a low-rank latent); --json writes them for ``kvsweep report --decode``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from transformers import DynamicCache, GPTNeoXForCausalLM

from kvsweep.adapters import ADAPTERS, AdapterSpec, attached, bind_adapters, kv_layout_of, make_adapter
from kvsweep.kvcache import base_layout, bytes_per_token
from kvsweep.latent import LatentDecoder, check_bytes, random_prompt
from kvsweep.models import dims, freeze, pythia_config, resolve_device

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def timed_decode(prefill, step, prompt: torch.Tensor, new_tokens: int) -> tuple[float, list[float]]:
    """Greedy: ``prefill(prompt) -> logits``, then ``step(tok) -> logits`` ``new_tokens`` times; (prefill s, step seconds)."""
    device = prompt.device
    sync(device)
    t0 = time.perf_counter()
    tok = prefill(prompt)[:, -1].argmax(-1, keepdim=True)
    sync(device)
    pre, times = time.perf_counter() - t0, []
    for _ in range(new_tokens):
        t = time.perf_counter()
        tok = step(tok)[:, -1].argmax(-1, keepdim=True)
        sync(device)
        times.append(time.perf_counter() - t)
    return pre, times


def latent_run(dec: LatentDecoder, prompt: torch.Tensor, new_tokens: int, cache_dtype: str):
    cache = dec.new_cache(prompt.shape[0], prompt.shape[1] + new_tokens)  # exactly prefill + decode steps
    pre, times = timed_decode(lambda ids: dec(ids, cache, last_only=True), lambda tok: dec(tok, cache), prompt, new_tokens)
    got = check_bytes(cache, dec.layout(), cache_dtype, dec.window_bytes())  # raises CacheMismatchError unless equal to the accounting
    return pre, times, got["measured_bytes_per_token"]


def hf_run(model, prompt: torch.Tensor, new_tokens: int):
    """transformers' own forward with a DynamicCache (the model's dtype)."""
    cache = DynamicCache(config=model.config)
    pre, times = timed_decode(lambda ids: model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1).logits,
                              lambda tok: model(input_ids=tok, cache=cache, use_cache=True).logits, prompt, new_tokens)
    return pre, times, None


def family_rows(d, budget: float) -> list[tuple[str, str, list[AdapterSpec]]]:
    """(family, method label, specs) of each registered family's representative method at ``budget`` of the base's KV
    bytes/token on a model of dims ``d``."""
    rows = [("vdproj", f"vdproj kv r={round(budget * d.hidden)}", [AdapterSpec.parse("vdproj", rank=max(1, round(budget * d.hidden)), target="kv")])]
    if "lowrank" in ADAPTERS:
        for g in sorted({g for g in (1, 2, 4, d.heads) if d.heads % g == 0}):
            r = max(1, round(budget * g * d.head_size))
            rows.append(("lowrank", f"lowrank g={g} r={r}", [AdapterSpec.parse("lowrank", group=g, k_rank=r, v_rank=r, init="svd")]))
    if "quant" in ADAPTERS:  # the most bits within the budget, metadata counted
        bits = fitting_bits(d, budget, [])
        if bits:
            rows.append(("quant", f"quant {bits} bits", [AdapterSpec.parse("quant", bits=bits)]))
        r = d.hidden // 2
        joint = AdapterSpec.parse("lowrank", group=d.heads, k_rank=r, v_rank=r, init="svd")
        bits = fitting_bits(d, budget, [joint]) if "lowrank" in ADAPTERS and budget < 0.5 else None  # a joint latent of rank d/2
        if bits:
            rows.append(("lowrank+quant", f"lowrank joint r={r} + quant {bits} bits", [joint, AdapterSpec.parse("quant", bits=bits)]))
    return rows


def share(d, specs: list[AdapterSpec]) -> float:
    """The methods' KV bytes/token over the base's (float16)."""
    adapters = [make_adapter(s, d) for s in specs]
    bind_adapters(adapters)
    base = base_layout(d.layers, d.hidden)
    return bytes_per_token(kv_layout_of(adapters, base)) / bytes_per_token(base)


def fitting_bits(d, budget: float, under: list[AdapterSpec]) -> int | None:
    """The most bits (8, 4, 2) at which quant, over the methods ``under``, holds at most ``budget`` of the base's bytes."""
    return next((b for b in (8, 4, 2) if share(d, under + [AdapterSpec.parse("quant", bits=b)]) <= budget + 1e-9), None)


def methods_label(specs: list[AdapterSpec]) -> str:
    """The methods as a trial's variant names them (``lowrank[g8,svd]+quant[kv,4b,G32,R128]``)."""
    return "+".join(ADAPTERS[s.name].label(s.options) for s in specs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--ranks", default="320,256,128")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="the model's (compute) dtype")
    p.add_argument("--cache-dtype", default="float16", choices=DTYPES)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--no-hf", action="store_true", help="skip the transformers reference row")
    p.add_argument("--budgets", default=None, help="shares of the base's KV bytes/token, e.g. 0.75,0.5,0.25,0.125: each family's "
                                                 "method at each (instead of --ranks)")
    p.add_argument("--json", default=None, help="also write the rows as JSON, for kvsweep report --decode")
    p.add_argument("--lowrank", default="", help="lowrank rows, GROUP:RANK comma-separated (heads per group, rank per group): "
                                                 "V alone and K+V at each")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    device = resolve_device(a.device)
    torch.manual_seed(0)
    model = freeze(GPTNeoXForCausalLM(pythia_config("70m")).to(DTYPES[a.dtype])).to(device)
    d = dims(model.config)
    prompt = random_prompt(model.config.vocab_size, a.batch, a.context).to(device)

    rows: list[tuple[str, int | None, LatentDecoder | None]] = [("base", None, LatentDecoder(model, [], cache_dtype=a.cache_dtype))]
    meta: dict[str, tuple[str, float, str]] = {}  # row name -> (family, budget, methods label), with --budgets

    def build(specs: list[AdapterSpec]) -> list:
        adapters = [make_adapter(s, d).to(device=device, dtype=DTYPES[a.dtype]).eval() for s in specs]
        with attached(model, adapters):  # inits from the base's weights alone (lowrank's svd) need no samples
            for ad in adapters:
                ad.calibrate(model, np.zeros((0, 1), dtype=np.int64))
        return adapters

    if a.budgets:
        for budget in (float(x) for x in a.budgets.split(",")):
            for family, label, specs in family_rows(d, budget):
                name = f"{label} ({100 * budget:g}%)"
                rows.append((name, None, LatentDecoder(model, build(specs), cache_dtype=a.cache_dtype)))
                meta[name] = (family, budget, methods_label(specs))
    else:
        for r in (int(x) for x in a.ranks.split(",")):
            vd = build([AdapterSpec.parse("vdproj", rank=r)])
            rows.append((f"vdproj r={r} fold", r, LatentDecoder(model, vd, cache_dtype=a.cache_dtype, fold=True)))
            rows.append((f"vdproj r={r} per-head", r, LatentDecoder(model, vd, cache_dtype=a.cache_dtype, fold=False)))
    for item in filter(None, a.lowrank.split(",")):
        g, r = (int(x) for x in item.split(":"))
        for target, ranks in (("v", {"v_rank": r}), ("kv", {"k_rank": r, "v_rank": r})):
            lr = build([AdapterSpec.parse("lowrank", group=g, init="random", **ranks)])
            rows.append((f"lowrank g={g} r={r} {target}", r, LatentDecoder(model, lr, cache_dtype=a.cache_dtype)))
    if not a.no_hf:
        rows.append(("transformers DynamicCache", None, None))

    steps: dict[str, list[float]] = {name: [] for name, _, _ in rows}
    prefill: dict[str, list[float]] = {name: [] for name, _, _ in rows}
    nbytes: dict[str, int | None] = {}
    run = lambda dec, ids, n: hf_run(model, ids, n) if dec is None else latent_run(dec, ids, n, a.cache_dtype)  # noqa: E731
    for name, _, dec in rows:  # warm-up
        run(dec, prompt[:, :16], 2)
    for _ in range(a.repeats):  # rows interleaved: a busy spell of the machine slows every row alike
        for name, _, dec in rows:
            pre, times, nbytes[name] = run(dec, prompt, a.new_tokens)
            prefill[name].append(pre)
            steps[name].extend(times)
    speeds = {name: prompt.shape[0] / statistics.median(t) for name, t in steps.items()}  # from the median step time

    base_b, base_s = nbytes["base"], speeds["base"]
    threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    print(f"\nPythia-70M architecture (random weights), context {a.context} + {a.new_tokens} decode steps, batch {a.batch}, "
          f"compute {a.dtype}, cache {a.cache_dtype}, {device}{threads}; {a.repeats} runs each, tokens/s from the median step time")
    tokens = a.batch * (a.context + a.new_tokens)
    width = max(26, *(len(name) for name, _, _ in rows))
    fixed = {name: (sum(ad.fixed_bytes(a.cache_dtype) for ad in dec.adapters) if dec is not None else None) for name, _, dec in rows}
    L = a.context
    mem_head = f"MB at {L}"
    print(f"| {'model':<{width}} | {'bytes/token':>11} | {'bytes ratio':>11} | {'cache MiB':>9} | {'fixed bytes':>11} | {mem_head:>10} | {'decode tok/s':>12} | {'speed ratio':>11} | {'prefill s':>9} |")
    print("|" + "|".join("-" * (w + 2) for w in (width, 11, 11, 9, 11, 10, 12, 11, 9)) + "|")
    for name, _, dec in rows:
        s, b = speeds[name], nbytes[name]
        bs = f"{b:>11,}" if b is not None else f"{'(' + a.dtype + ')':>11}"
        br = f"{b / base_b:>11.3f}" if b is not None else f"{'':>11}"
        mib = f"{b * tokens / 2**20:>9.2f}" if b is not None else f"{'':>9}"
        fx = f"{fixed[name]:>11,}" if fixed[name] is not None else f"{'':>11}"
        mem = f"{(fixed[name] + L * b) / 1e6:>10.2f}" if b is not None and fixed[name] is not None else f"{'':>10}"  # one sequence of L tokens
        print(f"| {name:<{width}} | {bs} | {br} | {mib} | {fx} | {mem} | {s:>12.1f} | {s / base_s:>11.3f} | {statistics.median(prefill[name]):>9.3f} |")
    if a.json:
        setting = f"pythia-70m (random weights), context {a.context}, batch {a.batch}, {device}, compute {a.dtype}, cache {a.cache_dtype}"
        out = {"setting": setting, "base": {"kv_bytes_per_token": base_b, "tokens_per_s": base_s},
               "rows": [{"family": meta[n][0], "method": n, "methods": meta[n][2], "budget": meta[n][1], "kv_bytes_per_token": nbytes[n], "fixed_bytes": fixed[n],
                         "memory_at_context": fixed[n] + a.context * nbytes[n], "tokens_per_s": speeds[n]}
                        for n, _, _ in rows if n in meta]}
        Path(a.json).write_text(json.dumps(out, indent=1))
        print(f"wrote {a.json}")
    if device.type == "cuda":
        print(f"peak CUDA memory allocated: {torch.cuda.max_memory_allocated(device) / 2**20:,.1f} MiB")


if __name__ == "__main__":
    main()
