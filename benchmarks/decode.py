"""Latent-cache decoding on Pythia-70M's architecture (random weights): cache bytes/token and decode speed.

    python benchmarks/decode.py [--context 2048] [--new-tokens 128] [--ranks 320,256,128] [--repeats 3]
                                [--device auto] [--dtype float32] [--cache-dtype float16] [--threads N]
                                [--lowrank 1:32,2:64,8:256]

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
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import DynamicCache, GPTNeoXForCausalLM

from kvsweep.adapters import AdapterSpec, make_adapter
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
    got = check_bytes(cache, dec.layout(), cache_dtype)  # raises CacheMismatchError unless equal to the accounting
    return pre, times, got["measured_bytes_per_token"]


def hf_run(model, prompt: torch.Tensor, new_tokens: int):
    """transformers' own forward with a DynamicCache (the model's dtype)."""
    cache = DynamicCache(config=model.config)
    pre, times = timed_decode(lambda ids: model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1).logits,
                              lambda tok: model(input_ids=tok, cache=cache, use_cache=True).logits, prompt, new_tokens)
    return pre, times, None


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
    for r in (int(x) for x in a.ranks.split(",")):
        vd = make_adapter(AdapterSpec.parse("vdproj", rank=r), d).to(device=device, dtype=DTYPES[a.dtype]).eval()
        rows.append((f"vdproj r={r} fold", r, LatentDecoder(model, [vd], cache_dtype=a.cache_dtype, fold=True)))
        rows.append((f"vdproj r={r} per-head", r, LatentDecoder(model, [vd], cache_dtype=a.cache_dtype, fold=False)))
    for item in filter(None, a.lowrank.split(",")):
        g, r = (int(x) for x in item.split(":"))
        for target, ranks in (("v", {"v_rank": r}), ("kv", {"k_rank": r, "v_rank": r})):
            lr = make_adapter(AdapterSpec.parse("lowrank", group=g, init="random", **ranks), d).to(device=device, dtype=DTYPES[a.dtype]).eval()
            rows.append((f"lowrank g={g} r={r} {target}", r, LatentDecoder(model, [lr], cache_dtype=a.cache_dtype)))
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
    print(f"| {'model':<26} | {'bytes/token':>11} | {'bytes ratio':>11} | {'cache MiB':>9} | {'decode tok/s':>12} | {'speed ratio':>11} | {'prefill s':>9} |")
    print(f"|{'-' * 28}|{'-' * 13}|{'-' * 13}|{'-' * 11}|{'-' * 14}|{'-' * 13}|{'-' * 11}|")
    for name, _, dec in rows:
        s, b = speeds[name], nbytes[name]
        bs = f"{b:>11,}" if b is not None else f"{'(' + a.dtype + ')':>11}"
        br = f"{b / base_b:>11.3f}" if b is not None else f"{'':>11}"
        mib = f"{b * tokens / 2**20:>9.2f}" if b is not None else f"{'':>9}"
        print(f"| {name:<26} | {bs} | {br} | {mib} | {s:>12.1f} | {s / base_s:>11.3f} | {statistics.median(prefill[name]):>9.3f} |")
    if device.type == "cuda":
        print(f"peak CUDA memory allocated: {torch.cuda.max_memory_allocated(device) / 2**20:,.1f} MiB")


if __name__ == "__main__":
    main()
