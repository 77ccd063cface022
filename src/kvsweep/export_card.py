"""The model card (README.md) of an exported trial: the base, the methods with their options and sources, the trial's
figures, and how to load it with kvsweep."""

from __future__ import annotations

import math

from .adapters import Adapter
from .export_info import ExportInfo, docstring_parts


def _number(value, fmt: str = ",") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return format(value, fmt)


def _ppl(value: float | None, base: float | None) -> str:
    if value is None:
        return "-"
    if base is None or not base:
        return f"{value:.4f}"
    return f"{value:.4f} (base {base:.4f}, {100 * (value - base) / base:+.2f}%)"


def model_card(info: ExportInfo, adapters: list[Adapter]) -> str:
    """README.md of an export: Markdown, with a metadata block for model hubs."""
    f, base, data = info.figures, info.base, info.config["data"]
    labels = " + ".join(a.label(a.options) for a in adapters)
    where = f"trial {info.trial_id} of the sweep {info.sweep}" if info.sweep else f"the kvsweep train trial {info.trial_id}"
    lines = [
        "---",
        "library_name: kvsweep",
        *([f"base_model: {base.name}"] if "/" in base.name and not base.random_init else []),
        "tags: [kv-cache-compression, kvsweep, " + ", ".join(sorted({a.family for a in adapters})) + "]",
        "---",
        "",
        f"# {labels} on {base.name}",
        "",
        f"KV-cache compression adapters trained by kvsweep on the frozen base `{base.name}`: {where}, "
        f"its best epoch ({_number(f.best_epoch)}, chosen on validation PPL). The base's weights are not included; "
        "loading downloads or builds them as kvsweep does.",
        "",
        "## Base",
        "",
        "| model | revision | dtype | tokenizer | random weights |",
        "| --- | --- | --- | --- | --- |",
        f"| `{base.name}` | {base.revision or 'default'} | {base.dtype} | {base.tokenizer or 'the model' + chr(39) + 's own'} | "
        f"{'yes (seed ' + str(base.seed) + ')' if base.random_init else 'no'} |",
        "",
        "## Methods",
        "",
    ]
    for a, spec, trained in zip(adapters, info.adapters, info.trained_as):
        summary, source = docstring_parts(a.name)
        options = ", ".join(f"{k}={v}" for k, v in trained.items() if k != "name")
        lines += [f"- **{a.name}** (`{a.label(a.options)}`, family {a.family}): {summary}", f"  - options: {options}"]
        resolved = {k: v for k, v in spec.to_dict().items() if k != "name"}
        if {k: trained.get(k) for k in resolved} != resolved:
            shown = ", ".join(f"{k}={v}" for k, v in resolved.items() if trained.get(k) != v)
            lines.append(f"  - as built after calibration (what loading builds, without calibration data): {shown}")
        lines.append(f"  - source: {source or 'not named in its docstring'}")
    kv, kv_base = f.kv_bytes_per_token, f.kv_bytes_per_token_base
    ratio = f" ({100 * kv / kv_base:.1f}% of the base's {kv_base:,})" if kv and kv_base else ""
    samples = f"{data.get('val_samples')} validation and {data.get('test_samples')} test samples"
    lines += [
        "",
        "## Figures",
        "",
        "| figure | value |",
        "| --- | --- |",
        f"| status | {f.status or '-'} after {_number(f.epochs_run)} epoch(s) |",
        f"| best epoch | {_number(f.best_epoch)} |",
        f"| validation PPL | {_ppl(f.best_val_ppl, f.base_val_ppl)} |",
        f"| test PPL | {_ppl(f.test_ppl, f.base_test_ppl)} |",
        f"| evaluation length | {_number(f.eval_seq_len)} tokens per sample |",
        f"| KV bytes/token | {_number(kv)}{ratio}, at {info.cache_dtype} |",
        f"| fixed bytes | {_number(f.fixed_bytes)} |",
        f"| trainable parameters | {_number(f.trainable_params)} |",
        f"| data | `{data.get('source')}`: {samples} (seed {data.get('seed')}), train at {data.get('seq_len')} tokens |",
        "",
        "PPL is per token over the data's validation and test samples; KV bytes/token is what the latent cache holds per "
        "token, summed over layers, metadata included; fixed bytes do not grow with the context.",
        "",
        "## Use with kvsweep",
        "",
        "```python",
        "import kvsweep",
        "",
        'trial = kvsweep.load_exported("path/to/this/folder")  # device="cuda" to choose',
        "logits = trial.model(input_ids=ids).logits             # (B, T, V), the adapters attached",
        "new = trial.generate(ids, 32).tokens                    # (B, 32) greedy, with the latent (compressed) cache",
        "trial.close()                                          # detach: trial.model is the base again",
        "```",
        "",
        "## Provenance",
        "",
        f"- trial: {info.trial_id}" + (f" of the sweep {info.sweep}" if info.sweep else "") + f", from `{info.source}`",
        f"- trained with kvsweep at git revision {f.git_revision or 'unknown'}; exported by kvsweep {info.kvsweep_version} "
        f"(git revision {info.exported_by_git_revision or 'unknown'})",
        f"- files: `adapters.safetensors` (weights, keys `adapters.<i>.<param>`), `kvsweep_adapters.json` (format "
        f"version {info.version}: the methods, the base, the trial's config and figures)",
        "",
    ]
    return "\n".join(lines)
