"""Compression methods (adapters): one file each, registered by name. Importing this package registers them all.

``base`` holds the method contract and the registry; ``options`` what the registry gives every method (flags,
search-space keys, result columns, labels)."""

# Registration order is the order of a search-space point's methods (and so of their seeded inits): keep it.
from . import vdproj, ka_gated, ka_replace, ka_residual  # noqa: F401, I001  (registration)
from .base import (ADAPTERS, TAPS, Adapter, AdapterOptions, AdapterSpec, adapter_class, attached, check_combination, disabled,
                   ensure_registered, external_methods, make_adapter, option, register_adapter)

__all__ = ["ADAPTERS", "TAPS", "Adapter", "AdapterOptions", "AdapterSpec", "adapter_class", "attached", "check_combination", "disabled",
           "ensure_registered", "external_methods", "make_adapter", "option", "register_adapter"]
