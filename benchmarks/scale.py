"""The driver's own cost per trial as a sweep grows: kvsweep's driver against plain Ray Tune, the same stub trials.

    python benchmarks/scale.py                          # 250, 1,000 and 4,000 trials
    python benchmarks/scale.py --trials 250,1000 --epochs 3 --epoch-seconds 0.05 --concurrency 8
    python benchmarks/scale.py --writer-only --trials 250,1000,4000,10000   # the results writer alone, no Ray
    python benchmarks/scale.py --scheduler-only --trials 250,1000,4000,10000   # the rung scheduler alone, no Ray
    python benchmarks/scale.py --trials 250,10000 --plain-up-to 250   # 10,000 trials through kvsweep only
    python benchmarks/scale.py --trials 250,1000 --repeats 3   # three runs of each driver per size, in turn; medians

``--writer-only``: the results writer driven as Tune drives it (start, one result per epoch, end; ``--concurrency``
trials running at once; by default a part per trial, ``--part-every 0``), with the stub's reports and no Ray: its flush time at the start and at the end of
the sweep, and what rebuilding and rewriting all tables at the end costs (what each flush cost before parts).

``--scheduler-only``: kvsweep's rung scheduler (``--scheduler``, moasha by default) driven as Tune drives it, with the stub's
results (each trial's epochs in turn, ``--concurrency`` at once) and its state in a temporary folder: milliseconds per
decision over the first and the last 10% of the trials, and the bytes it wrote per trial.

Per size, two runs on one in-process Ray (``--concurrency`` logical CPUs, one per trial):
- kvsweep: ``kvsweep.tune.run_sweep`` (the real driver: its scheduler, results writer, storage guard, lock,
  final gather) with ``SweepCfg.benchmark_stub_epoch_seconds`` set: each trial runs the same trainable path
  (``kvsweep.tune.trainable``) but reports synthetic ``EpochReport``s (``stub_reports``) ``--epoch-seconds``
  apart, with no model. The base is still evaluated once (the ``tiny`` preset), before Tune starts.
- plain Tune: ``tune.run`` of a function reporting the same ``stub_reports``, the same trials, epochs and
  resources, Ray Tune's ``ASHAScheduler`` with the same rungs (``FIFOScheduler`` against ``--scheduler fifo``),
  no kvsweep callbacks (Tune's default loggers), as silent as kvsweep's Tune (``verbose=0`` and ``quiet_ray``; kvsweep
  prints its console lines, which count in its time).

Both reuse Tune's trial actors (``tune.run(reuse_actors=True)``, as kvsweep's rounds do); ``--no-reuse-actors`` gives
both a new process per trial (through a wrapper of ``ray.tune.run`` here), which imports torch (about 6 CPU seconds
each on a small machine) and dwarfs all the driver does.

Measured over Tune's run (from Tune's experiment setup; kvsweep's up to ``run_sweep``'s return, so its final
gather of the tables is in; also Tune's loop alone, up to its experiment end): wall seconds, and the driver process's CPU seconds (``getrusage(RUSAGE_SELF)``,
all its threads) per trial, the CPU seconds of Tune's loop thread alone (``time.thread_time``: without Ray's driver threads,
whose CPU follows the wall time and so the machine's noise, not the trials), and every process's on the machine (Tune's loop;
Linux) per trial. Also the results writer's flush times for the first and the last 10% of the
trials it wrote. And the CPU seconds per trial of Tune's loop thread inside kvsweep's own hooks (``_HookClock``: its
schedulers' and callbacks' ``on_*`` methods), which separates what kvsweep adds to the loop from the loop's own work
(plain Tune's driver CPU per trial grows with the sweep too). Goal: kvsweep / plain Tune <= 1.10, and kvsweep's driver
CPU per trial flat within 20%.
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter, deque
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import ray  # noqa: E402
from ray import tune  # noqa: E402
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler  # noqa: E402

import numpy as np  # noqa: E402

import kvsweep.tune.driver as driver  # noqa: E402
from kvsweep.config import DataCfg, SweepCfg, TrainCfg  # noqa: E402
from kvsweep.evaluate import PositionStats, SplitStats  # noqa: E402
from kvsweep.tune import run_sweep  # noqa: E402
from kvsweep.tune.console import quiet_ray  # noqa: E402
from kvsweep.tune.local import start_local_ray  # noqa: E402
from kvsweep.tune.partwriter import ResultsWriter  # noqa: E402
from kvsweep.tune.rounds import make_scheduler  # noqa: E402
from kvsweep.tune.store import SweepStore  # noqa: E402
from kvsweep.tune.trainable import stub_reports  # noqa: E402
from kvsweep.tune.writer import TrialRecord, build_tables, write_tables  # noqa: E402

WRITERS: list[ResultsWriter] = []


class _RecordedWriter(ResultsWriter):
    """The driver's results writer, kept for its flush times."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        WRITERS.append(self)


class _Clock(tune.Callback):
    """The driver's wall clock and CPU time when Tune's experiment starts and ends, and the CPU time of Tune's loop
    thread alone (``time.thread_time``; without Ray's driver threads, whose CPU follows the wall time, not the trials)."""

    def setup(self, **info):
        if not hasattr(self, "start"):
            self.start = (time.perf_counter(), _cpu(), _machine_cpu(), time.thread_time())
            self.thread = threading.get_ident()

    def on_experiment_end(self, trials, **info):
        assert threading.get_ident() == self.thread, "Tune's loop moved to another thread"
        self.end = (time.perf_counter(), _cpu(), _machine_cpu(), time.thread_time())

    def loop(self) -> tuple[float, float, float]:
        """Tune's loop: wall seconds, the driver's CPU seconds, the loop thread's CPU seconds."""
        return tuple(self.end[i] - self.start[i] for i in (0, 1, 3))


class _HookClock:
    """CPU seconds of the driver's thread inside kvsweep's callbacks and schedulers on Tune's loop: every hook Tune
    calls on them (``on_*``, ``setup``, a logger's ``log_trial_*``, a scheduler's ``choose_trial_to_run``; their own or
    inherited from Ray's base classes) of ``kvsweep.tune``'s ``tune.Callback`` and ``TrialScheduler`` classes and the
    recording subclasses here, counted once where hooks call each other (``time.thread_time``)."""

    def __init__(self):
        self.local, self.by = threading.local(), Counter()  # by: seconds per "Class.method"

    @property
    def seconds(self) -> float:
        return sum(self.by.values())

    def install(self) -> None:
        modules = [m for name, m in sorted(sys.modules.items()) if name.startswith("kvsweep.tune") and m is not None]
        classes = {c for m in modules for c in vars(m).values() if isinstance(c, type) and c.__module__.startswith("kvsweep.tune")
                   and issubclass(c, (tune.Callback, TrialScheduler))} | {_RecordedWriter}
        for cls in classes:
            for name in dir(cls):
                if not (name.startswith(("on_", "log_trial_")) or name in ("setup", "choose_trial_to_run")):
                    continue
                owner = next(c for c in cls.__mro__ if name in vars(c))
                fn = vars(owner)[name]
                if callable(fn) and (owner is cls or (not owner.__module__.startswith("kvsweep") and owner.__module__ != __name__)):
                    setattr(cls, name, self._wrap(fn, f"{cls.__name__}.{name}"))

    def _wrap(self, fn, key: str):
        def timed(*args, **kw):
            depth = getattr(self.local, "depth", 0)
            self.local.depth = depth + 1
            t = time.thread_time()
            try:
                return fn(*args, **kw)
            finally:
                self.local.depth = depth
                if depth == 0:
                    self.by[key] += time.thread_time() - t
        return timed


HOOKS = _HookClock()


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _machine_cpu() -> float:
    """CPU seconds every process on this machine has used (Linux's ``/proc/stat``; NaN elsewhere): the driver, Ray's
    own processes and the trials' workers together."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return float("nan")
    busy = sum(int(x) for i, x in enumerate(fields[:8]) if i not in (3, 4))  # all but idle and iowait
    return busy / os.sysconf("SC_CLK_TCK")


def _space(n: int) -> dict:
    return {"rank": [16, 32], "seed": list(range((n + 1) // 2))}


def _sweep(name: str, storage: Path, a: argparse.Namespace) -> SweepCfg:
    return SweepCfg(name=name, storage=str(storage), report_dir=None, scheduler=a.scheduler, max_concurrent=a.concurrency,
                    grace_period=1, reduction_factor=2, data=DataCfg(train_samples=64, val_samples=16),
                    train=TrainCfg(epochs=a.epochs), benchmark_stub_epoch_seconds=a.epoch_seconds)


def run_kvsweep(n: int, storage: Path, a: argparse.Namespace) -> dict:
    clock = _Clock()
    WRITERS.clear()
    by0 = Counter(HOOKS.by)
    out = run_sweep(_sweep(f"scale-{n}", storage, a), _space(n), log=lambda s: None, callbacks=[clock])
    wall, cpu = time.perf_counter() - clock.start[0], _cpu() - clock.start[1]
    assert out.tables["trials"].num_rows == 2 * ((n + 1) // 2)
    timings = [t for w in WRITERS for t in w.timings]
    return {"wall": wall, "cpu": cpu, "loop": clock.loop(), "trials": out.tables["trials"].num_rows, "flush": _flush_stats(timings),
            "machine": clock.end[2] - clock.start[2], "hooks": HOOKS.seconds - sum(by0.values()),
            "by": HOOKS.by - by0}


def run_plain(n: int, storage: Path, a: argparse.Namespace, base_stats) -> dict:
    sweep = _sweep(f"plain-{n}", storage, a)

    def stub(config):
        for rep in stub_reports(config, sweep, base_stats):
            tune.report(rep.to_report())

    scheduler = FIFOScheduler() if a.scheduler == "fifo" else ASHAScheduler(time_attr="epoch", max_t=a.epochs, grace_period=1,
                                                                          reduction_factor=2)
    clock = _Clock()
    with quiet_ray(verbose=False):  # silent, as kvsweep's Tune (kvsweep prints its own console lines)
        analysis = tune.run(stub, name=f"plain-{n}", storage_path=str(storage), config={k: tune.grid_search(v) for k, v in _space(n).items()},
                            resources_per_trial={"cpu": 1}, max_concurrent_trials=a.concurrency, scheduler=scheduler, metric="val_ppl",
                            mode="min", callbacks=[clock], verbose=0, raise_on_failed_trial=False)
    return {"wall": time.perf_counter() - clock.start[0], "cpu": _cpu() - clock.start[1], "trials": len(analysis.trials),
            "loop": clock.loop(), "machine": clock.end[2] - clock.start[2]}


def _flush_stats(timings: list[tuple[int, float]]) -> str:
    """Median flush seconds over the first and the last 10% of the trials written."""
    if not timings:
        return "-"
    total = max(w for w, _s in timings) or 1
    first = [s for w, s in timings if w <= 0.1 * total]
    last = [s for w, s in timings if w >= 0.9 * total]
    fmt = lambda xs: f"{1000 * statistics.median(xs):.1f}" if xs else "-"  # noqa: E731
    return f"{fmt(first)} / {fmt(last)} ms ({len(timings)} flushes)"


def writer_only(n: int, storage: Path, a: argparse.Namespace) -> dict:
    """The results writer alone over ``n`` stub trials, ``a.concurrency`` at once; flush and final-gather seconds."""
    sweep = _sweep(f"writer-{n}", storage, a)
    sweep = SweepCfg(**{**sweep.__dict__, "benchmark_stub_epoch_seconds": 0.0})
    stats = PositionStats(np.full(sweep.data.eval_len - 1, np.log(40.0)), np.ones(sweep.data.eval_len - 1, dtype=np.int64))
    base = SplitStats(stats, stats)
    writer = ResultsWriter(sweep, base, SweepStore(str(storage), sweep.name), every=10.0, part_every=a.part_every, log=print)
    records: list[TrialRecord] = []
    configs = [{"rank": r, "seed": s} for s in range((n + 1) // 2) for r in (16, 32)][:n]
    running: deque[tuple[SimpleNamespace, list[dict]]] = deque()
    pending = deque(enumerate(configs))
    t0, cpu0 = time.perf_counter(), _cpu()
    while pending or running:  # the running trials' reports in turn, as Tune delivers them
        while pending and len(running) < a.concurrency:
            i, config = pending.popleft()
            trial = SimpleNamespace(trial_id=f"t{i:06d}", config=config)
            reports = [{**r.to_report(), "timestamp": time.time()} for r in stub_reports(config, sweep, base)]
            records.append(TrialRecord(trial.trial_id, config, list(reports)))
            writer.on_trial_start(0, [], trial)
            running.append((trial, reports))
        trial, reports = running.popleft()
        writer.on_trial_result(0, [], trial, reports.pop(0))
        if reports:
            running.append((trial, reports))
        else:
            writer.on_trial_complete(0, [], trial)
    loop = time.perf_counter() - t0, _cpu() - cpu0
    t1 = time.perf_counter()
    write_tables(build_tables(records, sweep, base, revision=writer.revision), writer.store)
    gather = time.perf_counter() - t1
    return {"loop": loop, "gather": gather, "flush": _flush_stats(writer.timings), "files": len(writer.parts)}


def scheduler_only(n: int, storage: Path, a: argparse.Namespace) -> dict:
    """The sweep's rung scheduler alone over ``n`` stub trials, ``a.concurrency`` at once: ms per result over the first
    and the last 10% of the trials, bytes written per trial."""
    sweep = _sweep(f"scheduler-{n}", storage, a)
    stats = PositionStats(np.full(sweep.data.eval_len - 1, np.log(40.0)), np.ones(sweep.data.eval_len - 1, dtype=np.int64))
    base, instant = SplitStats(stats, stats), SweepCfg(**{**sweep.__dict__, "benchmark_stub_epoch_seconds": 0.0})
    store = _CountingStore(str(storage), sweep.name)
    scheduler = make_scheduler(sweep, store)
    configs = [{"rank": r, "seed": s} for s in range((n + 1) // 2) for r in (16, 32)][:n]
    running: deque = deque()
    pending = deque(enumerate(configs))
    times: list[tuple[int, float]] = []
    stopped = 0
    t0 = time.perf_counter()
    while pending or running:
        while pending and len(running) < a.concurrency:
            i, config = pending.popleft()
            trial = SimpleNamespace(trial_id=f"t{i:06d}", config=config)
            running.append((i, trial, [r.to_report() for r in stub_reports(config, instant, base)]))
        i, trial, reports = running.popleft()
        t = time.perf_counter()
        decision = scheduler.on_trial_result(None, trial, reports.pop(0))
        times.append((i, time.perf_counter() - t))
        if decision == "STOP" or not reports:
            scheduler.on_trial_complete(None, trial, {})
            stopped += decision == "STOP" and bool(reports)
        else:
            running.append((i, trial, reports))
    first = [s for i, s in times if i < 0.1 * n]
    last = [s for i, s in times if i >= 0.9 * n]
    return {"seconds": time.perf_counter() - t0, "first": 1000 * statistics.mean(first), "last": 1000 * statistics.mean(last),
            "bytes": store.written / n, "stopped": stopped}


class _CountingStore(SweepStore):
    """A sweep folder that counts the bytes written to it."""

    written = 0

    def write_bytes(self, name: str, data: bytes) -> None:
        self.written += len(data)
        super().write_bytes(name, data)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", default="250,1000,4000", help="sweep sizes, comma-separated (default: 250,1000,4000)")
    p.add_argument("--epochs", type=int, default=3, help="epochs per trial (default: 3)")
    p.add_argument("--epoch-seconds", type=float, default=0.05, help="seconds between a stub trial's reports (default: 0.05)")
    p.add_argument("--concurrency", type=int, default=8, help="trials at once: Ray's logical CPUs, one per trial (default: 8)")
    p.add_argument("--scheduler", choices=("moasha", "asha", "fifo"), default="moasha",
                   help="kvsweep's scheduler (default: moasha); plain Tune gets ASHA with the same rungs, or FIFO for fifo")
    p.add_argument("--reuse-actors", action=argparse.BooleanOptionalAction, default=True,
                   help="both runs reuse Tune's trial actors (default); --no-reuse-actors: one process per trial")
    p.add_argument("--plain-up-to", type=int, default=None,
                   help="run plain Tune only at sizes up to this many trials (default: every size); larger: kvsweep alone")
    p.add_argument("--repeats", type=int, default=1,
                   help="runs of each driver per size, kvsweep and plain Tune in turn; the table gives the medians (default: 1)")
    p.add_argument("--writer-only", action="store_true", help="the results writer alone, no Ray (see above)")
    p.add_argument("--part-every", type=float, default=0.0,
                   help="--writer-only: the writer's part_every (default 0: a part per trial, the most flushes; the driver's: 1 s)")
    p.add_argument("--scheduler-only", action="store_true", help="the rung scheduler alone, no Ray (see above)")
    a = p.parse_args()
    if a.scheduler_only:
        with tempfile.TemporaryDirectory(prefix="kvsweep-scheduler-") as tmp:
            print(f"kvsweep --scheduler {a.scheduler}, {a.epochs} epochs per trial, {a.concurrency} trials at once")
            print("| trials | seconds | ms per result, first / last 10% of trials | bytes written per trial | stopped by a rung |")
            print("|---:|---:|---|---:|---:|")
            for n in [int(s) for s in a.trials.split(",") if s.strip()]:
                r = scheduler_only(n, Path(tmp) / str(n), a)
                print(f"| {n:,} | {r['seconds']:.1f} | {r['first']:.2f} / {r['last']:.2f} | {r['bytes']:,.0f} | {r['stopped']:,} |", flush=True)
        return
    if a.writer_only:
        with tempfile.TemporaryDirectory(prefix="kvsweep-writer-") as tmp:
            print("| trials | flushes' wall s (CPU s) | per trial ms | flush ms, first / last 10% | parts left | final gather s |")
            print("|---:|---:|---:|---|---:|---:|")
            for n in [int(s) for s in a.trials.split(",") if s.strip()]:
                r = writer_only(n, Path(tmp) / str(n), a)
                print(f"| {n:,} | {r['loop'][0]:.1f} ({r['loop'][1]:.1f}) | {1000 * r['loop'][0] / n:.1f} | {r['flush']} | {r['files']} | "
                      f"{r['gather']:.2f} |", flush=True)
        return
    run = tune.run
    tune.run = lambda *args, **kw: run(*args, **{**kw, "reuse_actors": a.reuse_actors})  # kvsweep's rounds call ray.tune.run too
    sizes = [int(s) for s in a.trials.split(",") if s.strip()]
    driver.ResultsWriter = _RecordedWriter  # the driver's writer, to read its flush times
    HOOKS.install()
    start_local_ray(num_cpus=a.concurrency, log_to_driver=False)
    rows = []
    with tempfile.TemporaryDirectory(prefix="kvsweep-scale-") as tmp:
        for n in sizes:
            ks, ts = [], []
            for r in range(a.repeats):  # in turn: a drift of the machine's speed reaches both drivers alike
                ks.append(run_kvsweep(n, Path(tmp) / f"kvsweep-{r}", a))
                sweep_json = Path(tmp) / f"kvsweep-{r}" / f"scale-{n}" / "sweep.json"
                base_stats = driver.SweepRecord.from_json(sweep_json.read_text(), "sweep.json").base_stats()
                if a.plain_up_to is None or n <= a.plain_up_to:
                    ts.append(run_plain(n, Path(tmp) / f"plain-{r}", a, base_stats))
                k, t = ks[-1], ts[-1] if ts else None
                plain = f"plain Tune {t['wall']:.1f} s, {1000 * t['cpu'] / n:.1f} ms/trial, loop thread {1000 * t['loop'][2] / n:.1f}" if t else "plain Tune not run"
                print(f"{n} trials, run {r + 1}/{a.repeats}: kvsweep {k['wall']:.1f} s, {1000 * k['cpu'] / n:.1f} ms driver CPU/trial, "
                      f"loop thread {1000 * k['loop'][2] / n:.1f}; {plain}; writer flush first/last 10%: {k['flush']}", flush=True)
            rows.append((n, _median_run(ks), _median_run(ts) if ts else None, ks, ts))
    ray.shutdown()
    print(f"\n{a.epochs} epochs per trial, {a.epoch_seconds:g} s apart; {a.concurrency} trials at once{', actors reused' if a.reuse_actors else ', a process per trial'}; kvsweep --scheduler "
          f"{a.scheduler} vs plain Tune {'FIFO' if a.scheduler == 'fifo' else 'ASHA'}; {os.cpu_count()} CPUs on this machine"
          + (f"; medians of {a.repeats} runs per size" if a.repeats > 1 else ""))
    print("| trials | kvsweep wall s | plain wall s | wall ratio | kvsweep driver CPU ms/trial | plain ms/trial | CPU ratio | "
          "kvsweep's hooks' CPU ms/trial | loop thread CPU ms/trial, kvsweep / plain (ratio) | Tune loop only: wall ratio, CPU ratio | "
          "all processes' CPU ms/trial, kvsweep / plain | writer flush ms, first / last 10% |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|---|")
    for n, k, t, _ks, _ts in rows:
        t = t or {"wall": math.nan, "cpu": math.nan, "loop": (math.nan,) * 3, "machine": math.nan}  # plain Tune not run: "nan"
        print(f"| {n:,} | {k['wall']:.1f} | {t['wall']:.1f} | {k['wall'] / t['wall']:.2f} | {1000 * k['cpu'] / n:.1f} | "
              f"{1000 * t['cpu'] / n:.1f} | {k['cpu'] / t['cpu']:.2f} | {1000 * k['hooks'] / n:.2f} | "
              f"{1000 * k['loop'][2] / n:.1f} / {1000 * t['loop'][2] / n:.1f} ({k['loop'][2] / t['loop'][2]:.2f}) | "
              f"{k['loop'][0] / t['loop'][0]:.2f}, {k['loop'][1] / t['loop'][1]:.2f} | "
              f"{1000 * k['machine'] / n:.0f} / {1000 * t['machine'] / n:.0f} | {k['flush']} |")
    if a.repeats > 1:
        for n, _k, _t, ks, ts in rows:
            if ts:
                print(f"{n:,} trials, loop thread CPU kvsweep / plain Tune in each run: "
                      + ", ".join(f"{x['loop'][2] / y['loop'][2]:.2f}" for x, y in zip(ks, ts)))
    if len(rows) > 1:
        plain = [(n, t) for n, _k, t, _ks, _ts in rows if t]
        kvsweep = [(n, k) for n, k, _t, _ks, _ts in rows]
        for what, per in (("kvsweep driver CPU", [k["cpu"] / n for n, k in kvsweep]), ("plain Tune driver CPU", [t["cpu"] / n for n, t in plain]),
                          ("kvsweep's loop thread CPU", [k["loop"][2] / n for n, k in kvsweep]),
                          ("plain Tune's loop thread CPU", [t["loop"][2] / n for n, t in plain]),
                          ("kvsweep's hooks' CPU", [k["hooks"] / n for n, k in kvsweep])):
            if len(per) > 1:
                print(f"{what} per trial, largest / smallest size: {per[-1] / per[0]:.2f}")
    print("kvsweep's hooks, CPU ms per trial: " + "; ".join(
        f"{n:,} trials: " + ", ".join(f"{key} {1000 * sec / n:.2f}" for key, sec in k["by"].most_common(5)) for n, k, *_ in rows))


def _median_run(runs: list[dict]) -> dict:
    """One driver's runs at one size as one: the median of each figure (of each element of a tuple); the hooks' seconds by
    hook and the writer's flush times of the run with the median wall time."""
    mid = sorted(runs, key=lambda r: r["wall"])[(len(runs) - 1) // 2]
    out = dict(mid)
    for key, value in mid.items():
        if isinstance(value, (int, float)):
            out[key] = statistics.median(r[key] for r in runs)
        elif isinstance(value, tuple):
            out[key] = tuple(statistics.median(r[key][i] for r in runs) for i in range(len(value)))
    return out


if __name__ == "__main__":
    sys.exit(main())
