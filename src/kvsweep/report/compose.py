"""What a report says: the document's sections, its figures and frontier.csv, made from an ``Analysis``."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np

from ..results import TRIAL_STATUSES
from . import figures, tables
from .analysis import Analysis, pick_evenly
from .load import EPOCHS, POSITIONS
from .render import Document, Image, Section
from .tables import degradation, share_of_base

MAX_CURVES = 8  # front trials drawn in the learning-curve and position figures
TIE_RULE = ("A trial is on the front unless another trial has a val PPL and a KV bytes/token that are both <= its own, "
            "one of them strictly; so exact duplicates on the front both stay.")


@dataclass(frozen=True)
class Built:
    doc: Document
    images: dict[str, bytes]  # file name -> PNG
    frontier_csv: str


def _plural(n: int, word: str) -> str:
    return f"{n:,} {word}{'' if n == 1 else 's'}"


def notices(an: Analysis) -> list[str]:
    """What is partial, missing or left out, source by source; empty when the results are complete."""
    out = []
    many = len(an.results) > 1
    for s, r in enumerate(an.results):
        where = f"`{r.label}`: " if many else ""
        if an.running[s]:
            ids = ", ".join(an.running[s][:3]) + (", ..." if len(an.running[s]) > 3 else "")
            out.append(f"{where}the sweep is still running (or was cut short): {_plural(len(an.running[s]), 'trial')} "
                       f"have epochs but no result in trials.parquet yet ({ids}); they are not in the fronts.")
        m = an.source_index == s
        err = np.flatnonzero(m & (an.status == "error"))
        if err.size:
            messages = an.column("error")
            first = next((f"{an.key[i]}: {str(messages[i]).splitlines()[0][:160]}" for i in err if messages[i]), None)
            out.append(f"{where}{_plural(err.size, 'trial')} ended in error" + (f" (first: {first})" if first else "") + "; left out of the fronts.")
        others = sorted({str(v) for v in an.status[m]} - set(TRIAL_STATUSES))
        for st in others:
            k = int((m & (an.status == st)).sum())
            out.append(f"{where}{_plural(k, 'trial')} with status `{st}` (not a final status: still running?); "
                       "they are in the fronts with their best epoch so far.")
        missing = int((m & ~an.eligibility.mask & (an.status != "error")).sum())
        if missing:
            out.append(f"{where}{_plural(missing, 'trial')} without a finite val PPL or KV bytes/token; left out of the fronts.")
        for n in r.notes:
            if n == f"{POSITIONS} is missing":
                n += ": no position-wise PPL for its trials"
            elif n == f"{EPOCHS} is missing":
                n += ": no learning curves for its trials"
            out.append(f"{where}{n}.")
    return out


def _front_summary(an: Analysis) -> str:
    if not an.front.size:
        return "No trial has a finite val PPL and KV bytes/token, so the front is empty."
    ends = []
    for i in (an.front[0], an.front[-1]) if an.front.size > 1 else (an.front[0],):
        share = share_of_base(an.kv_bytes[i], an.kv_base[i])
        ends.append(f"{an.key[i]} ({an.variant[i]}) at {an.kv_bytes[i]:,.0f} bytes/token"
                    + (f" ({share:.1f}% of the base's cache)" if np.isfinite(share) else "")
                    + f", PPL {an.val_ppl[i]:,.3f} ({tables.pct(degradation(an.val_ppl[i], an.base_ppl[i]))} against the base)")
    span = f"from {ends[0]} to {ends[1]}" if len(ends) == 2 else ends[0]
    return (f"{_plural(an.n, 'trial')} in {_plural(len(an.results), 'results folder')}; {an.eligibility.mask.sum():,} with finite metrics "
            f"and not failed; {an.front.size:,} on the Pareto front, {span}.")


def _figure_section(title: str, intro: str, images: dict, name: str, png, alt: str, caption: str,
                    missing: list[str], rows: str, table) -> Section:
    """A section of an introduction, a figure (when there is one), a note on front trials without rows, a table."""
    blocks: list = [intro]
    if png is not None:
        images[name] = png
        blocks.append(Image(name, alt, caption))
    if missing:
        more = ", ..." if len(missing) > 10 else ""
        blocks.append(f"No {rows} for {_plural(len(missing), 'front trial')}: {', '.join(missing[:10])}{more}.")
    blocks.append(table)
    return Section(title, tuple(blocks))


def build(an: Analysis, *, title: str) -> Built:
    """The report's document, figures and frontier.csv."""
    images: dict[str, bytes] = {}
    front = an.front
    chosen = pick_evenly(front, MAX_CURVES)
    subset = "" if chosen.size == front.size else f" ({chosen.size} of the {front.size} front trials, evenly spaced along the front)"

    images["front.png"] = figures.front_figure(an, title=title)
    summary = Section("Summary", (
        _front_summary(an),
        Image("front.png", "Val PPL against KV bytes/token of all trials, with the Pareto front",
              "Every trial with finite metrics that did not fail (colour: variant, marker: status); the black staircase is the "
              "Pareto front, numbered as in its table; the star is the base. Lower left is better."),
    ))

    front_blocks: list = [
        TIE_RULE + " Trials that ended in error or lack a finite val PPL or KV bytes/token are left out. "
        "The same trials with their full configs are in `frontier.csv`.",
        tables.frontier_table(an, front),
    ]
    sections = [summary, Section("Pareto front", tuple(front_blocks))]

    variant_blocks: list = ["Each variant's own front: the trials that no trial of the same variant beats."]
    if len(an.variant_fronts) > 1:
        images["front_variants.png"] = figures.variant_fronts_figure(an)
        variant_blocks.append(Image("front_variants.png", "Pareto front of each variant", "One staircase per variant; the star is the base."))
    variant_blocks.append(tables.variant_fronts_table(an))
    sections.append(Section("Fronts per variant", tuple(variant_blocks)))

    sections.append(Section("Overall perplexity", (
        "Validation PPL of the base and of each front trial (best epoch). Difference = trial - base; "
        "degradation = 100 * (trial - base) / base.",
        tables.overall_ppl_table(an, front),
    )))

    pos_table, pos_missing = tables.position_table(an, front)
    sections.append(_figure_section(
        "Position-wise perplexity",
        "PPL per position bucket `[lo, hi)` (the prediction at position i is of token i+1 from tokens 0..i), "
        "of each front trial and of the base.",
        images, "positions.png", figures.positions_figure(an, chosen),
        "PPL per position bucket of front trials against the base",
        f"Front trials{subset} against the base. Colour: variant, as in the other figures; line and marker: the trial.",
        pos_missing, "position rows", pos_table))

    curve_table, curve_missing = tables.learning_table(an, front)
    sections.append(_figure_section(
        "Learning curves",
        "Train and validation PPL per epoch of the front trials; the table gives the first and the last epoch, a few evenly spread "
        "between them, and the best epoch (— where a trial stopped earlier).",
        images, "learning_curves.png", figures.learning_figure(an, chosen),
        "Train and validation PPL per epoch of front trials",
        f"Front trials{subset}. Colour: variant, as in the other figures; line and marker: the trial. The black line is the base's val PPL.",
        curve_missing, "epoch rows", curve_table))

    sections.append(Section("What ASHA saved", (
        "Epochs the trials ran (sum of `epochs_run`) against the epochs they would have run without the scheduler: each trial it "
        "stopped (status `asha_stopped`) saved `max_epochs - epochs_run`. Trials that early-stopped by their own patience, "
        "ended in error or are still running saved nothing by the scheduler.",
        tables.asha_table(an),
        "Trials by status (running: epochs recorded but no result yet):",
        tables.status_table(an),
    )))

    sections.append(Section("Experiment history", (
        "One row per results folder, by the date its last trial finished: its best trial (lowest val PPL) against the base.",
        tables.history_table(an),
    )))

    found = notices(an)
    kind = "partial" if found else "complete"
    if not found:
        found = [f"Every trial of {'every sweep' if len(an.results) > 1 else 'the sweep'} has a result; none failed."]
    made = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    byline = f"Made by `kvsweep report` on {made} from " + ", ".join(f"`{r.source}`" for r in an.results) + "."
    doc = Document(title=title, byline=byline, notices=tuple(found), notice_kind=kind, sections=tuple(sections))
    return Built(doc=doc, images=images, frontier_csv=tables.frontier_csv(an, front))
