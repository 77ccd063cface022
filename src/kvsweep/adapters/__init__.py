"""Adapters: one file each, registered by name. Importing this package registers them all."""

from . import ka_gated, ka_replace, ka_residual, vdproj  # noqa: F401  (registration)
from .base import ADAPTERS, TAPS, Adapter, AdapterOptions, AdapterSpec, adapter_class, attached, check_combination, disabled, make_adapter, register_adapter

__all__ = ["ADAPTERS", "TAPS", "Adapter", "AdapterOptions", "AdapterSpec", "adapter_class", "attached", "check_combination", "disabled", "make_adapter", "register_adapter"]
