"""Adapter-training throughput per device: how trials are run, side by side, on one machine.

    python benchmarks/throughput.py                                # GPU: Pythia-70M architecture; CPU: tiny
    python benchmarks/throughput.py --model pythia-70m --device cuda --pack 8,32 --ray 8
    python benchmarks/throughput.py --model tiny --device cpu --pack 4 --steps 10      # ratios only

Every row trains V-DProj (rank --rank on every layer) on a frozen base through kvsweep's own training
step (``kvsweep.train.train_step``, the code sweeps run), each trial at its own batch (--batch x
--seq-len tokens), and prints adapter-training tokens/s (summed over the trials of the row), ms per
step, an estimated MFU (model FLOPs per token: forward plus the input-gradient half of the backward
for the frozen base, forward and both backward halves for the adapter, over --peak-tflops) and peak
GPU memory. Rows:

- eager fp32 / eager autocast: one trial, the base in float32 (autocast is the default on CUDA);
- bf16 base: the frozen base held in bfloat16 (not autocast), the adapters in float32 under autocast;
- chunked loss: the LM loss from hidden states, --loss-chunk tokens' logits at a time (``loss_chunk``);
- compiled: ``torch.compile`` of the training forward (``TrainCfg.compile``: mode reduce-overhead, CUDA
  graphs, on CUDA; default mode on CPU, with --compile);
- K Ray workers: K processes at 1/K of the device each, started together (what K fractional-GPU Tune
  trials do), each one trial;
- packed K: K trials in one process sharing one base (``kvsweep.pack``), one forward over all their
  batches per step.

Then trial start-up: from a trial's start to its first training step, with the base loaded from a
saved folder (the sweep's cache) and the samples given, for a trial alone and for a trial joining a
running pack; and the import time of kvsweep's trial code in a fresh interpreter.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from transformers.utils import logging as hf_logging

from kvsweep.adapters import AdapterSpec
from kvsweep.config import DataCfg, ModelCfg, TrainCfg
from kvsweep.data import Samples
from kvsweep.models import Base, dims, load_base, resolve_device
from kvsweep.pack import Pack
from kvsweep.train import Driver, TrialCfg, TrialRun, train_step

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16 tensor-core peaks


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def flops_per_token(base: Base, adapter_params: int, seq_len: int) -> float:
    """Training FLOPs per token: the frozen base's forward and input-gradient backward, the adapter's all three."""
    d = dims(base.config)
    weights = sum(p.numel() for n, p in base.model.named_parameters() if "embed_in" not in n)  # matmul weights + head
    attention = 2 * 2 * d.layers * d.hidden * seq_len / 2  # QK^T and AV per token, causal: half the positions
    forward = 2 * weights + attention
    return 2 * forward + 6 * adapter_params


def trial_cfg(a, *, seed: int, dtype: str = "float32", amp: str = "auto", loss_chunk: int = 0, compile_mode: str = "off") -> TrialCfg:
    return TrialCfg(model=ModelCfg(name=a.model, random_init=a.model != "tiny", dtype=dtype),
                    data=DataCfg(seq_len=a.seq_len, train_samples=8, val_samples=4),
                    adapters=(AdapterSpec.parse("vdproj", rank=a.rank),),
                    train=TrainCfg(batch_size=a.batch, epochs=1, amp=amp, seed=seed, loss_chunk=loss_chunk, compile=compile_mode))


def random_samples(vocab: int, n_train: int, seq_len: int, seed: int = 0) -> Samples:
    rng = np.random.default_rng(seed)
    return Samples(train=rng.integers(0, vocab, (n_train, seq_len), dtype=np.int32),
                   val=rng.integers(0, vocab, (4, seq_len), dtype=np.int32))


def load(a, device: torch.device, dtype: str = "float32") -> Base:
    return load_base(ModelCfg(name=a.model, random_init=a.model != "tiny", dtype=dtype, device=str(device)), log=lambda m: None)


def attached_run(cfg: TrialCfg, base: Base, samples: Samples, *, start: bool = False) -> TrialRun:
    """A trial alone, its adapters attached directly to the base, as ``run_trial`` does (no routers); with ``start``,
    also set up and evaluated at init, as ``run_trial``'s driver does."""
    if start:
        return Driver(base, samples, log=lambda m: None).add(cfg)
    run = TrialRun(cfg, base, samples, log=lambda m: None)
    for ad in run.adapters:
        ad.attach(base.model)
    return run


def time_steps(step, device: torch.device, warmup: int, steps: int) -> list[float]:
    for _ in range(warmup):
        step()
    sync(device)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t)
    return times


def run_row(a, device: torch.device, *, k: int = 1, dtype: str = "float32", amp: str = "auto", loss_chunk: int = 0,
            compile_mode: str = "off") -> dict:
    """K trials (1: alone) in this process; the median step time over --steps after --warmup."""
    base = load(a, device, dtype)
    n_steps = a.warmup + a.steps
    samples = random_samples(base.config.vocab_size, a.batch * n_steps, a.seq_len)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    cfgs = [trial_cfg(a, seed=i, dtype=dtype, amp=amp, loss_chunk=loss_chunk, compile_mode=compile_mode) for i in range(k)]
    model = base.model  # train_step compiles it (TrainCfg.compile), as sweeps do
    if k == 1:  # alone: the trial's adapters attached directly, as run_trial does (no routers)
        run = attached_run(cfgs[0], base, samples, start=True)
        runs = [run]
        step = lambda: train_step(model, runs)  # noqa: E731
    else:
        pack = Pack(base, samples, log=lambda m: None)
        runs = [pack.add(c) for c in cfgs]
        step = lambda: train_step(model, runs, route=pack.routing)  # noqa: E731
    times = time_steps(step, device, a.warmup, a.steps)
    adapter_params = sum(p.numel() for p in runs[0].trainable)
    ms = 1000 * statistics.median(times)
    tokens = k * a.batch * a.seq_len
    return {"trials": k, "ms": ms, "tok_s": tokens / (ms / 1000), "flops_tok": flops_per_token(base, adapter_params, a.seq_len),
            "mem": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None}


def ray_rows(a, device: torch.device, k: int) -> dict:
    """K Ray workers at 1/K of the device each (CPU: 1/K of --threads), one trial each, timed together."""
    import ray

    ray.init(include_dashboard=False, log_to_driver=False, num_cpus=max(k, 2), num_gpus=1 if device.type == "cuda" else 0)
    try:
        @ray.remote
        class Barrier:
            def __init__(self, n: int):
                self.n, self.arrived = n, 0

            def arrive(self) -> None:
                self.arrived += 1

            def ready(self) -> bool:
                return self.arrived >= self.n

        barrier = Barrier.remote(k)
        threads = max(1, a.threads // k) if device.type == "cpu" else 1

        def worker(barrier) -> tuple[float, float, int]:
            torch.set_num_threads(threads)
            dev = resolve_device("cuda" if device.type == "cuda" else "cpu")
            base = load(a, dev)
            samples = random_samples(base.config.vocab_size, a.batch * (a.warmup + a.steps), a.seq_len, seed=1)
            run = attached_run(trial_cfg(a, seed=0), base, samples)
            for _ in range(a.warmup):
                train_step(base.model, [run])
            sync(dev)
            ray.get(barrier.arrive.remote())
            while not ray.get(barrier.ready.remote()):
                time.sleep(0.01)
            t0 = time.time()
            for _ in range(a.steps):
                train_step(base.model, [run])
            sync(dev)
            return t0, time.time(), a.steps * a.batch * a.seq_len

        remote = ray.remote(num_gpus=1 / k if device.type == "cuda" else 0, num_cpus=1)(worker)
        spans = ray.get([remote.remote(barrier) for _ in range(k)])
    finally:
        ray.shutdown()
    wall = max(e for _, e, _ in spans) - min(s for s, _, _ in spans)
    tokens = sum(n for _, _, n in spans)
    return {"trials": k, "ms": 1000 * wall / a.steps, "tok_s": tokens / wall, "flops_tok": None, "mem": None}


def startup(a, device: torch.device, k: int) -> dict:
    """Seconds from a trial's start to its first training step: alone (base loaded from a saved folder) and
    joining a running pack; and importing kvsweep's trial code in a fresh interpreter."""
    out = {}
    with tempfile.TemporaryDirectory(prefix="kvsweep-bench-") as tmp:
        base = load(a, torch.device("cpu"))
        folder = Path(tmp) / "base"
        base.model.save_pretrained(folder)
        if base.tokenizer is not None:
            base.tokenizer.save_pretrained(folder)
        samples = random_samples(base.config.vocab_size, a.batch * 4, a.seq_len)  # the sweep's cached samples
        samples = Samples(train=samples.train, val=np.resize(samples.val, (a.val_samples, a.seq_len)))
        cfg = replace(trial_cfg(a, seed=0), model=ModelCfg(name=str(folder), device=str(device)))
        sync(device)
        t0 = time.perf_counter()
        b = load_base(cfg.model, log=lambda m: None)
        t_load = time.perf_counter() - t0
        run = attached_run(cfg, b, samples, start=True)
        train_step(b.model, [run])
        sync(device)
        out["alone"] = (time.perf_counter() - t0, t_load)
        for ad in run.adapters:
            ad.detach()
        pack = Pack(b, samples, log=lambda m: None)
        first = pack.add(trial_cfg(a, seed=1))
        pack.step([first])
        sync(device)
        t0 = time.perf_counter()
        joined = pack.add(trial_cfg(a, seed=2), base_stats=first.base_stats)
        pack.step([first, joined])
        sync(device)
        out["pack"] = time.perf_counter() - t0
        for r in list(pack.runs):
            pack.remove(r)
        t0 = time.perf_counter()  # a whole pack's trials starting at once (a sweep's start): set up, evaluated together
        many = pack.add_many([{"cfg": trial_cfg(a, seed=10 + i), "base_stats": first.base_stats} for i in range(k)])
        pack.step(many)
        sync(device)
        out["together"] = (k, time.perf_counter() - t0)
        pack.close()
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import kvsweep.train, kvsweep.pack"], check=True)
    out["import"] = time.perf_counter() - t0
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="tiny or pythia-70m (random weights); default: pythia-70m on CUDA, tiny on CPU")
    p.add_argument("--device", default="auto")
    p.add_argument("--rank", type=int, default=None, help="V-DProj rank (default: 5/8 of the hidden size: 320 on Pythia-70M)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--pack", default=None, help="comma-separated pack sizes (default: 8,32 on CUDA, 4 on CPU)")
    p.add_argument("--ray", type=int, default=None, help="Ray workers sharing the device (default: 8 on CUDA, 2 on CPU; 0: skip)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per row (default: 30 on CUDA, 5 on CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 5 on CUDA, 2 on CPU)")
    p.add_argument("--loss-chunk", type=int, default=4096)
    p.add_argument("--compile", action="store_true", help="also the torch.compile rows on CPU (always on CUDA)")
    p.add_argument("--val-samples", type=int, default=64, help="validation samples a trial evaluates at start-up")
    p.add_argument("--peak-tflops", type=float, default=None, help="for MFU (default: by GPU name; none on CPU)")
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args()
    hf_logging.disable_progress_bar()
    device = resolve_device(a.device)
    cuda = device.type == "cuda"
    a.model = a.model or ("pythia-70m" if cuda else "tiny")
    a.steps = a.steps or (30 if cuda else 5)
    a.warmup = a.warmup if a.warmup is not None else (5 if cuda else 2)
    a.ray = a.ray if a.ray is not None else (8 if cuda else 2)
    if a.threads:
        torch.set_num_threads(a.threads)
    a.threads = torch.get_num_threads()
    packs = [int(x) for x in (a.pack or ("8,32" if cuda else "4")).split(",")]
    if a.rank is None:
        a.rank = 5 * dims(load(a, torch.device("cpu")).config).hidden // 8
    peak = a.peak_tflops
    if peak is None and cuda:
        name = torch.cuda.get_device_name(device)
        peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)

    autocast = "auto" if cuda else "off"
    rows: list[tuple[str, dict]] = []

    def add(name: str, **kw) -> None:
        t0 = time.perf_counter()
        try:
            r = run_row(a, device, **kw)
        except Exception as e:  # a row that cannot run here (no compiler, out of memory) is reported, not fatal
            print(f"{name}: failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", flush=True)
            return
        rows.append((name, r))
        print(f"{name}: {r['tok_s']:,.0f} tokens/s, {r['ms']:.2f} ms/step ({time.perf_counter() - t0:.0f} s)", flush=True)

    add("eager fp32", amp="off")
    if cuda:
        add("eager autocast bf16 (default)", amp="auto")
    add("bf16 base", dtype="bfloat16", amp="auto")
    add(f"chunked loss ({a.loss_chunk})", amp=autocast, loss_chunk=a.loss_chunk)
    mode = "reduce-overhead" if cuda else "default"
    if cuda or a.compile:
        add("compiled", amp=autocast, compile_mode=mode)
        add("bf16 base, chunked loss, compiled", dtype="bfloat16", amp="auto", loss_chunk=a.loss_chunk, compile_mode=mode)
    if a.ray:
        try:
            r = ray_rows(a, device, a.ray)
            rows.append((f"{a.ray} Ray workers, 1/{a.ray} device each", r))
        except Exception as e:
            print(f"Ray workers: failed: {type(e).__name__}: {e}", flush=True)
    for k in packs:
        add(f"packed {k}", k=k, amp=autocast)
        add(f"packed {k}, bf16 base", k=k, dtype="bfloat16", amp="auto")
        add(f"packed {k}, bf16 base, chunked loss", k=k, dtype="bfloat16", amp="auto", loss_chunk=a.loss_chunk)
        if cuda or a.compile:
            add(f"packed {k}, bf16 base, chunked loss, compiled", k=k, dtype="bfloat16", amp="auto", loss_chunk=a.loss_chunk,
                compile_mode=mode)
    su = startup(a, device, max(packs))

    where = torch.cuda.get_device_name(device) if cuda else f"CPU, {a.threads} threads"
    print(f"\n{a.model} architecture{' (random weights)' if a.model != 'tiny' else ''}, V-DProj rank {a.rank} on every layer, "
          f"each trial at batch {a.batch} x {a.seq_len} tokens; {where}; median of {a.steps} steps after {a.warmup}")
    print(f"| {'how':<46} | {'trials':>6} | {'tokens/s':>12} | {'ms/step':>9} | {'est. MFU':>8} | {'GPU GiB':>7} | {'vs eager':>8} |")
    print(f"|{'-' * 48}|{'-' * 8}|{'-' * 14}|{'-' * 11}|{'-' * 10}|{'-' * 9}|{'-' * 10}|")
    ref = rows[0][1]["tok_s"] if rows else 1.0
    for name, r in rows:
        mfu = f"{100 * r['tok_s'] * r['flops_tok'] / (peak * 1e12):>7.1f}%" if peak and r["flops_tok"] else f"{'':>8}"
        mem = f"{r['mem']:>7.2f}" if r["mem"] is not None else f"{'':>7}"
        print(f"| {name:<46} | {r['trials']:>6} | {r['tok_s']:>12,.0f} | {r['ms']:>9.2f} | {mfu} | {mem} | {r['tok_s'] / ref:>7.2f}x |")
    if rows and rows[0][1]["flops_tok"]:
        print(f"model FLOPs per training token (estimate): {rows[0][1]['flops_tok'] / 1e6:,.0f} M")
    alone, load_s = su["alone"]
    print(f"trial start-up to the first training step: alone {alone:.2f} s (of which loading the base {load_s:.2f} s, "
          f"{a.val_samples} validation samples evaluated); joining a running pack {su['pack']:.2f} s; "
          f"{su['together'][0]} trials starting a pack together: {su['together'][1]:.2f} s to the first step of all; "
          f"importing kvsweep's trial code in a fresh interpreter {su['import']:.2f} s")


if __name__ == "__main__":
    main()
