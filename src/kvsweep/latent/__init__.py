"""The latent-cache inference path: decoding with a KV cache that holds only what the adapters leave.

    decoder = LatentDecoder(model, adapters, cache_dtype="float16")   # the adapters' own modules, V-DProj folded
    gen = generate(decoder, prompt_ids, 32, temperature=0.8, top_k=40, generator=torch.Generator().manual_seed(0))
    check_bytes(gen.cache, decoder.layout(), "float16")                # measured == accounted, or CacheMismatchError
    measure_cache(model, adapters, context=2048, new_tokens=128)       # what ``kvsweep cache`` reports
"""

from .cache import CACHE_DTYPES, CacheMismatchError, LatentCache, check_bytes
from .decoder import LatentDecoder
from .generate import Generation, generate, next_token
from .measure import compare, measure_bytes, measure_cache, random_prompt, reference_logits

__all__ = ["CACHE_DTYPES", "CacheMismatchError", "Generation", "LatentCache", "LatentDecoder", "check_bytes", "compare",
           "generate", "measure_bytes", "measure_cache", "next_token", "random_prompt", "reference_logits"]
