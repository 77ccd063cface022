"""``ka_gated``: ``A + g * ka`` with a learned per-layer gate ``g`` that starts at 0, so training starts
exactly at the frozen base."""

from ..models import Dims
from .base import register_adapter
from .ka import KAAdapter


@register_adapter("ka_gated")
class KAGated(KAAdapter):
    gated = True

    @classmethod
    def noop_options(cls, dims: Dims) -> dict:
        return {}  # the gate starts at 0

    @staticmethod
    def combine(layer, a, ka):
        return a + layer.gate * ka
