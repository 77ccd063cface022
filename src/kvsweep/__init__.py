"""kvsweep: how much of a frozen Pythia model's KV cache can small trained adapters remove, and at what perplexity cost.

``kvsweep.load_exported(DIR)`` loads a trial written by ``kvsweep export`` (imported on first use: ``import kvsweep``
stays light)."""

__version__ = "0.1.0"
__all__ = ["load_exported"]


def __getattr__(name: str):
    """``load_exported`` from ``kvsweep.export``, imported when first asked for (PEP 562)."""
    if name == "load_exported":
        from .export import load_exported

        return load_exported
    raise AttributeError(f"module 'kvsweep' has no attribute {name!r}")
