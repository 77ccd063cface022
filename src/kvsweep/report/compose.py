"""What a report says: the document's sections, its figures and frontier.csv, made from an ``Analysis``."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone

from . import downstream, figures, front_tables, leaderboard, tables, trial_tables
from .analysis import Analysis, pick_evenly
from .frontier_csv import frontier_csv
from .notices import CANDIDATES, SEEDS, front_summary, headline_sentence, hypervolume_sentence, notices, plural, search_sentence
from .render import Document, Image, Section

MAX_CURVES = 8  # front points drawn in the learning-curve, position and memory figures
TIE_RULE = ("A point is on the front unless another point has a mean val PPL and a {cost} that are both <= its own, "
            "one of them strictly; so exact duplicates on the front both stay.")


@dataclass(frozen=True)
class Built:
    doc: Document
    images: dict[str, bytes]  # file name -> PNG
    frontier_csv: str


def _figure_section(title: str, intro: str, images: dict, name: str, png, alt: str, caption: str,
                    missing: list[str], rows: str, table) -> Section:
    """A section of an introduction, a figure (when there is one), a note on front trials without rows, a table."""
    blocks: list = [intro]
    if png is not None:
        images[name] = png
        blocks.append(Image(name, alt, caption))
    if missing:
        more = ", ..." if len(missing) > 10 else ""
        blocks.append(f"No {rows} for {plural(len(missing), 'front point')}: {', '.join(missing[:10])}{more}.")
    blocks.append(table)
    return Section(title, tuple(blocks))


def _summary(an: Analysis, title: str, images: dict[str, bytes]) -> Section:
    images["front.png"] = figures.front_figure(an, title=title)
    blocks: list = [front_summary(an), headline_sentence(an), hypervolume_sentence(an), search_sentence(an),
                    Image("front.png", f"Val PPL against {an.axis.short} of all trials, with the Pareto front",
                          "Every trial with finite metrics that did not fail (colour: variant, marker: status); the black staircase is the "
                          "Pareto front of the configurations (mean over seeds, 95% CI bars), numbered as in its table; the star is the "
                          "base. Lower left is better.")]
    test = figures.front_test_figure(an) if an.headline == "test" else None
    if test is not None:
        images["front_test.png"] = test
        blocks.append(Image("front_test.png", "Test PPL of the front's points", "The front's points (chosen on validation) at their "
                            "test PPL, mean over seeds with 95% CI bars, against the base's test PPL."))
    return Section("Summary", tuple(blocks))


def _memory(an: Analysis, chosen, images: dict[str, bytes]) -> Section:
    L = an.axis.context
    blocks: list = [
        f"Memory at L = fixed bytes + L x KV bytes/token: the cache of one sequence of L tokens with the methods' weights and other "
        f"fixed bytes, against the base's L x KV bytes/token (it adds none). L = {L:,}: {an.axis.context_source}. The break-even "
        "context is the smallest L at which a point's memory is below the base's (never when its cache is not smaller per token). "
        "Set L with `kvsweep report --context L`; `--x memory-at-L` builds the fronts on memory at L instead of bytes/token.",
        front_tables.memory_table(an, an.front),
    ]
    png = figures.memory_figure(an, chosen)
    if png is not None:
        images["memory.png"] = png
        blocks.append(Image("memory.png", "Memory against context length of the base and of front points",
                            "Memory of one sequence against its length, both axes logarithmic; ◆ marks each point's break-even context."))
    return Section("Memory at L and break-even context", tuple(blocks))


def _families(an: Analysis, budgets: tuple[float, ...], decode: leaderboard.DecodeFigures | None,
              images: dict[str, bytes]) -> Section:
    L = an.axis.context
    split = "test" if an.headline == "test" else "validation"
    blocks: list = [
        "Each family's best point within each budget of the base's KV cache (KV bytes/token at most that share of the "
        f"base's): the point of the lowest mean val PPL among the family's points within it (validation makes every choice), "
        f"at its {split} PPL over seeds with a 95% CI; memory at L = {L:,} tokens. Set the budgets with `kvsweep report "
        "--budgets`." + (f" Decode speed: `benchmarks/decode.py --json` ({decode.setting}), the family's method at that "
                         "budget on the benchmark's model." if decode is not None else
                         " Give `--decode FILE` (written by `benchmarks/decode.py --json`) for each family's decode speed."),
        leaderboard.leaderboard_table(an, leaderboard.leaderboard(an, budgets), decode),
    ]
    if len(an.family_fronts) > 1:
        images["front_families.png"] = figures.family_fronts_figure(an)
        blocks.append(Image("front_families.png", "Pareto front of each family",
                            "One staircase per family (the colour of its variants' shades in the other figures); the star is the base."))
    if decode is not None:
        blocks += [f"The decode benchmark's rows ({decode.setting}):", leaderboard.decode_table(decode)]
    return Section("Families and the leaderboard", tuple(blocks))


def _downstream(an: Analysis, images: dict[str, bytes]) -> Section | None:
    items, left = downstream.settings(an)
    if not items and not left:
        return None
    blocks: list = [
        "lm-evaluation-harness tasks (`kvsweep downstream`) of the base and of the trials it evaluated, by point: the mean "
        "over the seeds evaluated with a 95% CI, or lm-eval's standard error for one seed. Scoring tasks ran the adapted "
        "forward, generation tasks the latent cache. Points are numbered as on the front (# n)."]
    png = downstream.downstream_figure(an, items)
    if png is not None:
        images["downstream.png"] = png
        blocks.append(Image("downstream.png", "Downstream scores against KV bytes/token",
                            "Per task (its main metric), each evaluated point's score against its KV bytes/token, coloured by "
                            "variant, with 95% CI bars over seeds (one seed: ± lm-eval's stderr); the star and dashed line are the base's."))
    if left:
        more = ", ..." if len(left) > 10 else ""
        blocks.append(f"Left out: {plural(len(left), 'evaluated trial')} that {'is' if len(left) == 1 else 'are'} no front "
                      f"candidate (stopped by the scheduler, failed, or not in these results): {', '.join(left[:10])}{more}.")
    blocks.append(downstream.downstream_table(an, items))
    return Section("Downstream tasks", tuple(blocks))


def build(an: Analysis, *, title: str, budgets: tuple[float, ...] = leaderboard.BUDGETS,
          decode: leaderboard.DecodeFigures | None = None) -> Built:
    """The report's document, figures and frontier.csv; ``budgets`` (shares of the base's KV bytes/token) and the decode
    benchmark's figures make the leaderboard."""
    images: dict[str, bytes] = {}
    front = an.front
    chosen = pick_evenly(front, MAX_CURVES)
    subset = "" if chosen.size == front.size else f" ({chosen.size} of the {front.size} front points, evenly spaced along the front)"
    sections = [_summary(an, title, images), Section("Pareto front", (
        TIE_RULE.format(cost=an.axis.short) + " " + CANDIDATES + " " + SEEDS + " The same points with their full configs "
        "are in `frontier.csv`.", front_tables.frontier_table(an, front)))]

    sections.append(_families(an, budgets, decode, images))
    variant_blocks: list = ["Each variant's own front: the points that no point of the same variant beats."]
    if len(an.variant_fronts) > 1:
        images["front_variants.png"] = figures.variant_fronts_figure(an)
        variant_blocks.append(Image("front_variants.png", "Pareto front of each variant", "One staircase per variant; the star is the base."))
    variant_blocks.append(front_tables.variant_fronts_table(an))
    sections.append(Section("Fronts per variant", tuple(variant_blocks)))

    sections.append(Section("Overall perplexity", (
        ("Test and validation" if an.headline == "test" else "Validation") + " PPL of the base and of each front point (best epoch, "
        "mean over seeds, 95% CI). Difference = point - base; degradation = 100 * (point - base) / base.",
        front_tables.overall_ppl_table(an, front))))
    down = _downstream(an, images)
    if down is not None:
        sections.append(down)
    sections.append(_memory(an, chosen, images))
    sections.append(Section("Hypervolume", (
        "The area the front dominates between it and the reference point (the base's cost, the base's PPL x 1.5), both minimised: "
        "one number to compare two searches' fronts (`kvsweep.report.pareto.hypervolume`). Normalised: each coordinate divided by "
        "the reference's, so the box from the origin to the reference is 1."
        + (" Test: the same points (chosen on validation) at their test PPL." if an.headline == "test" else ""),
        front_tables.hypervolume_table(an))))

    split = trial_tables.position_split(an, front)
    pos_table, pos_missing = trial_tables.position_table(an, front)
    sections.append(_figure_section(
        "Position-wise perplexity",
        f"{split.capitalize()} PPL per position bucket `[lo, hi)` (the prediction at position i is of token i+1 from tokens 0..i), "
        "of each front point (mean over its seeds, 95% CI) and of the base.",
        images, "positions.png", figures.positions_figure(an, chosen, split),
        "PPL per position bucket of front points against the base",
        f"Front points{subset} against the base; a band is a 95% CI over seeds. Colour: variant, as in the other figures; line and marker: the point.",
        pos_missing, "position rows", pos_table))

    curve_table, curve_missing = trial_tables.learning_table(an, front)
    sections.append(_figure_section(
        "Learning curves",
        "Train and validation PPL per epoch of each front point's first seed; the table gives the first and the last epoch, a few "
        "evenly spread between them, and the best epoch (— where a trial stopped earlier).",
        images, "learning_curves.png", figures.learning_figure(an, chosen),
        "Train and validation PPL per epoch of front points",
        f"Front points{subset}. Colour: variant, as in the other figures; line and marker: the point. The black line is the base's val PPL.",
        curve_missing, "epoch rows", curve_table))

    sections.append(Section("Scheduler and search", (
        "Epochs the trials ran (sum of `epochs_run`) against the epochs they would have run without the scheduler: each trial it "
        "stopped (status `asha_stopped`) saved `max_epochs - epochs_run`. Trials that early-stopped by their own patience, "
        "ended in error or are still running saved nothing by the scheduler. " + CANDIDATES,
        tables.scheduler_table(an),
        "The searcher (from the sweep's sweep.json): trials run against the configurations of the search space's grid.",
        tables.search_table(an),
        "Trials by status (running: epochs recorded but no result yet):",
        tables.status_table(an),
    )))
    sections.append(Section("Experiment history", (
        "One row per results folder, by the date its last trial finished: its best point (lowest mean val PPL) against the base.",
        trial_tables.history_table(an),
    )))

    found = notices(an)
    kind = "partial" if found else "complete"
    if not found:
        found = [f"Every trial of {'every sweep' if len(an.results) > 1 else 'the sweep'} has a result; none failed."]
    made = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    byline = f"Made by `kvsweep report` on {made} from " + ", ".join(f"`{r.source}`" for r in an.results) + "."
    doc = Document(title=title, byline=byline, notices=tuple(found), notice_kind=kind, sections=tuple(sections))
    return Built(doc=doc, images=images, frontier_csv=frontier_csv(an, front))
