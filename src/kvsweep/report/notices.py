"""The report's words about its results: what is partial, missing or left out (the notices at its top), and the
summary's sentences (the front's ends, the headline split, the front's candidates, the hypervolume, the scheduler
and searcher)."""

from __future__ import annotations

import numpy as np

from ..results import TRIAL_STATUSES
from .analysis import FRONT_STATUSES, Analysis
from .front_tables import flag, front_volumes
from .load import EPOCHS, POSITIONS
from .memory import break_even
from .tables import ci, degradation, pct, share_of_base

CANDIDATES = ("Front candidates are the trials that ran to their end (`completed`) or stopped by their own patience "
              "(`early_stopped`), with a finite val PPL and cost. Trials the scheduler stopped (`asha_stopped`) have the PPL of "
              "their first epochs, which does not compare with that of trials trained to the end: they are drawn and counted, "
              "but are no front candidates; nor are failed trials and trials still running.")
SEEDS = ("Trials whose configurations differ only by their seed are one point: its PPL is their mean with a 95% t-interval "
         "(mean ± t(0.975, n-1) · s/√n); one seed gives no interval. A point whose interval holds the base's PPL is "
         "\"not distinguishable from the base\".")


def plural(n: int, word: str) -> str:
    return f"{n:,} {word}{'' if n == 1 else 's'}"


def notices(an: Analysis) -> list[str]:
    """What is partial, missing or left out, source by source; empty when the results are complete."""
    out = []
    many = len(an.results) > 1
    messages = an.column("error")
    for s, r in enumerate(an.results):
        where = f"`{r.label}`: " if many else ""
        if an.running[s]:
            ids = ", ".join(an.running[s][:3]) + (", ..." if len(an.running[s]) > 3 else "")
            out.append(f"{where}the sweep is still running (or was cut short): {plural(len(an.running[s]), 'trial')} "
                       f"have epochs but no result in trials.parquet yet ({ids}); they are not in the fronts.")
        m = an.source_index == s
        err = np.flatnonzero(m & (an.status == "error"))
        if err.size:
            first = next((f"{an.key[i]}: {str(messages[i]).splitlines()[0][:160]}" for i in err if messages[i]), None)
            out.append(f"{where}{plural(err.size, 'trial')} ended in error" + (f" (first: {first})" if first else "") + "; left out of the fronts.")
        for st in sorted({str(v) for v in an.status[m]} - set(TRIAL_STATUSES)):
            k = int((m & (an.status == st)).sum())
            out.append(f"{where}{plural(k, 'trial')} with status `{st}` (not a final status: still running?); "
                       "they are drawn with their best epoch so far, but are no front candidates.")
        missing = int((m & ~an.eligibility.mask & (an.status != "error")).sum())
        if missing:
            what = "val PPL or KV bytes/token" + (" and fixed bytes (memory at L needs them)" if an.axis.is_memory else "")
            out.append(f"{where}{plural(missing, 'trial')} without a finite {what}; left out of the fronts.")
        if an.headline == "test":
            no_test = int(np.sum((an.points.source == s) & (an.points.test.n == 0)))
            if no_test:
                out.append(f"{where}{plural(no_test, 'configuration')} without a test PPL (results before the test split); "
                           "their test cells are empty.")
        for n in r.notes:
            if n == f"{POSITIONS} is missing":
                n += ": no position-wise PPL for its trials"
            elif n == f"{EPOCHS} is missing":
                n += ": no learning curves for its trials"
            out.append(f"{where}{n}.")
    return out


def headline_sentence(an: Analysis) -> str:
    if an.headline == "test":
        return ("Headline figures are test PPL (samples never used for any choice); the front, each trial's best epoch and "
                "the scheduler's decisions are chosen on validation, which the tables also give.")
    return ("No test PPL in these results (written before the test split): the figures are validation PPL, the same "
            "samples the best epochs and the front were chosen on, so they flatter the trials somewhat.")


def front_summary(an: Analysis) -> str:
    """The front's two ends in the headline split, with their intervals and break-even contexts."""
    if not an.front.size:
        return (f"No front candidate (status {' or '.join(FRONT_STATUSES)}, finite val PPL and cost) among "
                f"{plural(an.n, 'trial')}, so the front is empty.")
    P = an.points
    ends = []
    for p in (an.front[0], an.front[-1]) if an.front.size > 1 else (an.front[0],):
        share = share_of_base(P.kv[p], P.kv_base[p])
        iv = an.headline_interval(p)
        d = flag(an, p)
        be = float(break_even(P.fixed[p], P.kv[p], P.kv_base[p]))
        ends.append(f"{P.label[p]} ({P.variant[p]}) at {P.kv[p]:,.0f} bytes/token"
                    + (f" ({share:.1f}% of the base's cache)" if np.isfinite(share) else "")
                    + f", {an.headline} PPL {iv.mean:,.3f}" + (f" (95% CI {ci(iv)})" if iv.has_interval else " (1 seed)")
                    + f", {pct(degradation(iv.mean, an.headline_base(p)))} against the base"
                    + (", not distinguishable from it" if d is False else "")
                    + ("" if not np.isfinite(be) else f", smaller than the base's cache from {be:,.0f} tokens on"))
    span = f"from {ends[0]} to {ends[1]}" if len(ends) == 2 else ends[0]
    return (f"{plural(an.n, 'trial')} in {plural(len(an.results), 'results folder')}; {an.eligibility.candidate.sum():,} front "
            f"candidates in {plural(an.points.n, 'configuration')}; {an.front.size:,} on the Pareto front of "
            f"{an.axis.short} and mean val PPL, {span}.")


def hypervolume_sentence(an: Analysis) -> str:
    vols = [v for v in front_volumes(an) if v.split == "validation"]
    if not vols:
        return "No hypervolume: the results have no base PPL."
    shown = "; ".join(f"{'' if len(vols) == 1 else f'`{v.label}` '}{v.normalised:.4f}" for v in vols)
    return (f"Hypervolume of the front on validation, normalised (share of the box from the origin to the reference: the base's "
            f"{an.axis.short} and its PPL x 1.5): {shown}.")


def search_sentence(an: Analysis) -> str:
    parts = []
    for r in an.results:
        if r.sweep is None:
            continue
        what = f"scheduler {r.sweep.scheduler or 'unknown'}, searcher {r.sweep.search}"
        parts.append(what if len(an.results) == 1 else f"`{r.label}`: {what}")
    if not parts:
        return "The results hold no sweep.json, so the scheduler and searcher are not known."
    return "Run with " + "; ".join(parts) + " (what each saved: [Scheduler and search](#scheduler-and-search))."
