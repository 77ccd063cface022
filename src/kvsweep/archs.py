"""GPT-NeoX configs of Pythia's architecture family, built in code without a download: the released
Pythia sizes (``pythia_config``) and any other size of the family (``neox_config``, e.g. the tiny preset's)."""

from __future__ import annotations

from transformers import GPTNeoXConfig

from .config import ConfigError

# (layers, hidden, heads, intermediate, vocab) of the released Pythia models; all share rotary on 25% of
# each head (base 10,000), parallel residual, untied embeddings, 2,048 positions and GELU.
PYTHIA_ARCHS: dict[str, tuple[int, int, int, int, int]] = {
    "70m": (6, 512, 8, 2048, 50304),
    "160m": (12, 768, 12, 3072, 50304),
    "410m": (24, 1024, 16, 4096, 50304),
    "1b": (16, 2048, 8, 8192, 50304),
    "1.4b": (24, 2048, 16, 8192, 50304),
    "2.8b": (32, 2560, 32, 10240, 50304),
    "6.9b": (32, 4096, 32, 16384, 50432),
    "12b": (36, 5120, 40, 20480, 50688),
}


def pythia_config(size: str) -> GPTNeoXConfig:
    """The ``GPTNeoXConfig`` of a released Pythia size (``"70m"`` ... ``"12b"``), built without a download."""
    if size not in PYTHIA_ARCHS:
        raise ConfigError(f"model: unknown Pythia size {size!r}; valid sizes: {', '.join(PYTHIA_ARCHS)}")
    layers, hidden, heads, inter, vocab = PYTHIA_ARCHS[size]
    return neox_config(layers=layers, hidden=hidden, heads=heads, intermediate=inter, vocab=vocab, positions=2048)


def neox_config(*, layers: int, hidden: int, heads: int, intermediate: int, vocab: int, positions: int) -> GPTNeoXConfig:
    """A GPT-NeoX config of Pythia's family: partial rotary 0.25, parallel residual, untied embeddings."""
    return GPTNeoXConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=intermediate,
        hidden_act="gelu",
        max_position_embeddings=positions,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
        use_parallel_residual=True,
        tie_word_embeddings=False,
        layer_norm_eps=1e-5,
        attention_dropout=0.0,
        hidden_dropout=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
