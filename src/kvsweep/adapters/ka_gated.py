"""``ka_gated``: ``A + g * ka`` with a learned per-layer gate ``g`` that starts at 0, so training starts
exactly at the frozen base."""

from .base import register_adapter
from .ka import KAAdapter


@register_adapter("ka_gated")
class KAGated(KAAdapter):
    gated = True

    @staticmethod
    def combine(layer, a, ka):
        return a + layer.gate * ka
