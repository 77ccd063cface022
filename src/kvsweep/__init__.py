"""kvsweep: how much of a frozen Pythia model's KV cache can small trained adapters remove, and at what perplexity cost."""

__version__ = "0.1.0"
