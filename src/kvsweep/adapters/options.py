"""What the registry alone gives every method: its command-line flags, its search-space keys, its result
columns and its report label. Nothing here names a method.

    flags           --adapter vdproj --vdproj.rank 64 --vdproj.init pca    (and each method's ``aliases``: --rank 64)
    search space    {"vdproj.rank": [64, 128], "ka": ["none", "ka_gated"], "ka.layers": ["last"]}
    result columns  vdproj.rank, vdproj.init, ..., ka_gated.layers, ...     (one per option of every method)

In a search-space point, a method takes part when its family's key names it (``"ka": "ka_gated"``;
``"none"`` for none of the family), or, without that key, when one of its options is given a value
other than None. ``"<family>.<option>"`` sets an option of whichever method of the family takes part.
"""

from __future__ import annotations

import argparse
from dataclasses import MISSING, asdict, fields
from typing import Any, Iterable

import pyarrow as pa

from ..config import ConfigError
from ..results.metrics import ARROW_TYPES, optional_inner
from .base import ADAPTERS, Adapter, AdapterSpec, adapter_class, check_combination, option_hints

NONE = ("none", None, "")


def option_fields(cls: type[Adapter]) -> list:
    """The dataclass fields of ``cls.Options``, in their declared order (``layers`` first)."""
    return list(fields(cls.Options))


def _type_of(cls: type[Adapter], name: str) -> Any:
    return option_hints(cls.Options)[name]


def _scalar(cls: type[Adapter], name: str) -> type | None:
    """int, float, bool or str when the option has that one type (or is that type or None); None otherwise (given
    as text, turned into its type by ``AdapterSpec.parse`` or the options' own validation)."""
    t = optional_inner(_type_of(cls, name))
    return t if t in (int, float, bool, str) else None


def space_aliases(cls: type[Adapter]) -> dict[str, str]:
    """The method's older search-space keys (its ``aliases`` that are not ``no-X`` flags, ``-`` as ``_``) -> its option."""
    return {a.replace("-", "_"): o for a, o in cls.aliases.items() if not a.startswith("no-")}


def registry_order(names: Iterable[str]) -> list[str]:
    """``names`` in the order their methods were registered: the order of a trial's methods (and of their inits)."""
    names = set(names)
    return [m for m in ADAPTERS if m in names]


def families() -> dict[str, list[str]]:
    """Each family's registered methods, in registration order."""
    out: dict[str, list[str]] = {}
    for name, cls in ADAPTERS.items():
        out.setdefault(cls.family, []).append(name)
    return out


# ----------------------------------------------------------------------------- command-line flags


def add_method_args(g: argparse._ArgumentGroup) -> None:
    """``--adapter NAME`` (repeatable), one ``--<method>.<option>`` flag per option of every registered method
    and the methods' ``aliases`` (older flags). Every flag defaults to None: the option's own default."""
    names = ", ".join(ADAPTERS)
    g.add_argument("--adapter", action="append", default=[], help=f"a method: {names}; repeat to combine methods of different families")
    seen: set[str] = set()
    for method, cls in ADAPTERS.items():
        for f in option_fields(cls):
            flags = [f"--{method}.{f.name.replace('_', '-')}"] + ([f"--{method}.{f.name}"] if "_" in f.name else [])
            _add_option_flag(g, cls, f, flags, dest=f"{method}.{f.name}", help_prefix=method)
        for alias, opt in cls.aliases.items():
            if alias in seen:
                continue
            seen.add(alias)
            f = next(x for x in option_fields(cls) if x.name == opt)
            if alias.startswith("no-") and _scalar(cls, opt) is bool:
                g.add_argument(f"--{alias}", dest=f"alias.{alias}", action="store_const", const=False, default=None,
                               help=f"same as --no-{method}.{opt.replace('_', '-')}")
            else:
                who = method if len(families()[cls.family]) == 1 else f"<{cls.family} method>"
                _add_option_flag(g, cls, f, [f"--{alias}"], dest=f"alias.{alias}", help_prefix=f"same as --{who}.{opt}")


def _add_option_flag(g, cls: type[Adapter], f, flags: list[str], *, dest: str, help_prefix: str) -> None:
    kind = _scalar(cls, f.name)
    meta = f.metadata or {}
    default = " (required)" if meta.get("required") else "" if f.default in (MISSING, None) else f" (default: {f.default})"
    help_ = f"{help_prefix}: {meta.get('help', '')}{default}".replace("%", "%%")
    if kind is bool:
        g.add_argument(*flags, dest=dest, action=argparse.BooleanOptionalAction, default=None, help=help_)
    else:
        g.add_argument(*flags, dest=dest, type=kind or str, default=None, choices=meta.get("choices"), help=help_,
                       metavar=None if meta.get("choices") else f.name.upper())


def specs_from_args(a: argparse.Namespace) -> tuple[AdapterSpec, ...]:
    """The methods named by ``--adapter`` or by one of their ``--<method>.<option>`` flags, with their options,
    checked as a combination.

    Raises:
        ConfigError: an unknown method or option value, or methods that cannot be combined.
    """
    given = vars(a)
    named = list(dict.fromkeys(a.adapter))
    for name in named:
        adapter_class(name)
    implied = [m for m, cls in ADAPTERS.items()
               if m not in named and any(given.get(f"{m}.{f.name}") is not None for f in option_fields(cls))]
    # registry order (as in a search-space point: the order their seeded inits are drawn in), unless --adapter names
    # several methods in an order of its own
    names = named + implied if len(named) > 1 else registry_order(named + implied)
    specs = []
    for name in names:
        cls = ADAPTERS[name]
        opts = {}
        for alias, opt in cls.aliases.items():
            if given.get(f"alias.{alias}") is not None:
                opts[opt] = given[f"alias.{alias}"]
        for f in option_fields(cls):
            if given.get(f"{name}.{f.name}") is not None:
                opts[f.name] = given[f"{name}.{f.name}"]
            elif (f.metadata or {}).get("required") and f.name not in opts:
                flags = [f"--{name}.{f.name.replace('_', '-')}"] + [f"--{al}" for al, o in cls.aliases.items() if o == f.name]
                raise ConfigError(f"{name} needs {' or '.join(flags)} ({(f.metadata or {}).get('help', f.name)})")
        specs.append(AdapterSpec.parse(name, **opts))
    check_combination(tuple(specs))
    return tuple(specs)


# ----------------------------------------------------------------------------- search space


def space_keys() -> dict[str, str]:
    """Every key a search-space point may hold for methods, with what it means."""
    keys: dict[str, str] = {}
    for family, members in families().items():
        keys.setdefault(family, f"the {family} method: none, {', '.join(members)}")
        for method in members:
            cls = ADAPTERS[method]
            for f in option_fields(cls):
                help_ = (f.metadata or {}).get("help", "")
                keys[f"{method}.{f.name}"] = f"{method}: {help_}"
                if len(members) > 1 or family != method:
                    keys.setdefault(f"{family}.{f.name}", f"{family} (any of its methods): {help_}")
            for alias, opt in space_aliases(cls).items():
                keys.setdefault(alias, f"{family}: same as {family}.{opt}")
    return keys


def specs_from_point(point: dict) -> tuple[AdapterSpec, ...]:
    """The methods of one search-space point (keys of ``space_keys``; others are not looked at), with their options.

    Raises:
        ConfigError: a family key naming a method of another family, an option its method rejects, or
            methods that cannot be combined.
    """
    fams = families()
    specs = []
    for family, members in fams.items():
        chosen: str | None
        if family in point:
            value = point[family]
            chosen = None if value in NONE else str(value)
            if chosen is not None and chosen not in members:
                raise ConfigError(f"{family} must be one of none, {', '.join(members)}; got {value!r}")
        else:
            given = [m for m in members if _options_in(point, ADAPTERS[m])]
            if len(given) > 1:
                raise ConfigError(f"options of {' and '.join(given)} are given, but a trial uses one {family} method: "
                                  f"name it with the key {family!r}")
            chosen = given[0] if given else None
        if chosen is None:
            continue
        cls = ADAPTERS[chosen]
        opts = {}
        for f in option_fields(cls):  # the most general key first, the most specific last
            for key in [a for a, o in space_aliases(cls).items() if o == f.name] + [f"{family}.{f.name}", f"{chosen}.{f.name}"]:
                if point.get(key) is not None:
                    opts[f.name] = point[key]
        specs.append(AdapterSpec.parse(chosen, **opts))
    specs = [next(s for s in specs if s.name == n) for n in registry_order([s.name for s in specs])]
    check_combination(tuple(specs))
    return tuple(specs)


def canonical_key(key: str) -> str:
    """A method's older search-space key as its own: ``"rank"`` -> ``"vdproj.rank"``, ``"ka_layers"`` -> ``"ka.layers"``
    (the family's, where the family has several methods); any other key as it is."""
    fams = families()
    for method, cls in ADAPTERS.items():
        opt = space_aliases(cls).get(key)
        if opt is not None:
            return f"{method}.{opt}" if len(fams[cls.family]) == 1 else f"{cls.family}.{opt}"
    return key


def canonical_space(space: dict) -> dict:
    """``space`` with the methods' older keys renamed to their own (``canonical_key``), in the same order.

    Raises:
        ConfigError: a field given twice, under its older key and its own.
    """
    out: dict = {}
    for key, values in space.items():
        new = canonical_key(key)
        if new in out:
            raise ConfigError(f"search space: {new} is given twice (as {key!r} too)")
        out[new] = values
    return out


def _options_in(point: dict, cls: type[Adapter]) -> bool:
    """Whether ``point`` gives one of ``cls``'s own options a value other than None (or an alias of one, when
    ``cls`` is its family's only method: an alias of a family of several names none of them)."""
    alone = len(families()[cls.family]) == 1
    aliases = space_aliases(cls) if alone else {}
    keys = {f.name: [f"{cls.name}.{f.name}"] + [a for a, o in aliases.items() if o == f.name] for f in option_fields(cls)}
    required = [f.name for f in option_fields(cls) if (f.metadata or {}).get("required")]
    if any(k in point and point[k] is None for r in required for k in keys[r]):
        return False  # a required option given as None: the method is not in the point ({"rank": None}: no V-DProj)
    return any(point.get(k) is not None for ks in keys.values() for k in ks)


# ----------------------------------------------------------------------------- result columns and labels


def _arrow_type(cls: type[Adapter], name: str) -> pa.DataType:
    return ARROW_TYPES.get(_scalar(cls, name), pa.string())


def option_columns() -> list[tuple[str, pa.DataType]]:
    """``(<method>.<option>, type)`` for every option of every registered method: the trials table's method columns."""
    return [(f"{m}.{f.name}", _arrow_type(cls, f.name)) for m, cls in ADAPTERS.items() for f in option_fields(cls)]


def _cell(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return ",".join(str(v) for v in value)
    return value


def option_values(specs: Iterable[AdapterSpec]) -> dict[str, Any]:
    """A trial's method columns: each option of its methods (null for the methods it does not use; a list of
    layers as ``"0,2"``; an option left at None as null)."""
    out: dict[str, Any] = {}
    for s in specs:
        for name, value in asdict(s.options).items():
            out[f"{s.name}.{name}"] = value if _scalar(ADAPTERS[s.name], name) else _cell(value)
    return out


def describe(specs: Iterable[AdapterSpec]) -> str:
    """The methods with the options that differ from their defaults: ``"vdproj rank=64 init=pca + ka_gated"``."""
    parts = []
    for s in specs:
        defaults = {f.name: f.default for f in option_fields(ADAPTERS[s.name])}
        changed = [f"{k}={_cell(v)}" for k, v in asdict(s.options).items() if defaults.get(k, MISSING) != v]
        parts.append(" ".join([s.name, *changed]))
    return " + ".join(parts) or "base"


def variant_label(specs: Iterable[AdapterSpec], schedule: str) -> str:
    """The methods' report labels and the schedule, e.g. ``"vdproj[v,pca]+ka_gated / rec_to_lm"``: a report's colour."""
    return f"{'+'.join(ADAPTERS[s.name].label(s.options) for s in specs) or 'base'} / {schedule}"


def method_columns(specs: tuple[AdapterSpec, ...], schedule: str) -> dict[str, Any]:
    """A trial's method columns of the trials table: variant, adapters, family, options and one per option."""
    return {"variant": variant_label(specs, schedule), "adapters": "+".join(s.name for s in specs) or "base",
            "family": "+".join(ADAPTERS[s.name].family for s in specs) or "base", "options": describe(specs),
            **option_values(specs)}
