"""``ka_replace`` (KA-Attention, "V -> A"): the KA output replaces the attention output."""

from .base import register_adapter
from .ka import KAAdapter


@register_adapter("ka_replace")
class KAReplace(KAAdapter):
    @staticmethod
    def combine(layer, a, ka):
        return ka
