"""``ka_residual`` (PretrainedMKA V2): the KA output is added to the attention output, ``A + ka``."""

from .base import register_adapter
from .ka import KAAdapter


@register_adapter("ka_residual")
class KAResidual(KAAdapter):
    @staticmethod
    def combine(layer, a, ka):
        return a + ka
