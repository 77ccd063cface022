"""Compression methods (adapters): one file each, registered by name. Importing this package registers them all.

``base`` holds the method contract and the registry; ``options`` what the registry gives every method (flags,
search-space keys, result columns, labels)."""

import importlib
import pkgutil

# Registration order is the order of a trial's methods (and so of their seeded inits): these first, as always;
# then any other method file in this folder, by name.
from . import vdproj, ka_gated, ka_replace, ka_residual  # noqa: F401, I001  (registration)
from .base import (ADAPTERS, TAPS, Adapter, AdapterOptions, AdapterSpec, adapter_class, attached, bind_adapters, check_combination,
                   disabled, check_taps, ensure_registered, external_methods, kv_layout_of, make_adapter, option, register_adapter)

__all__ = ["ADAPTERS", "TAPS", "Adapter", "AdapterOptions", "AdapterSpec", "adapter_class", "attached", "bind_adapters",
           "check_combination", "disabled", "check_taps", "kv_layout_of", "ensure_registered", "external_methods", "make_adapter", "option", "register_adapter"]

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if _module not in ("base", "codec", "options", "quant_code"):
        importlib.import_module(f".{_module}", __name__)
