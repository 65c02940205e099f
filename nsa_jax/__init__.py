"""nsa-jax: Native Sparse Attention (Yuan et al., 2025) for JAX, with Pallas kernels.

The functional ops follow `SPEC.md`; `nsa_jax.nn` holds the Flax NNX layers.
"""

from nsa_jax.config import NSAConfig
from nsa_jax.decode import DecodeCache
from nsa_jax.decode import init_decode_cache
from nsa_jax.decode import init_separate_kv_cache
from nsa_jax.decode import nsa_decode_step
from nsa_jax.decode import nsa_decode_step_separate_kv
from nsa_jax.decode import nsa_prefill
from nsa_jax.decode import nsa_prefill_separate_kv
from nsa_jax.ops import IMPLEMENTATIONS
from nsa_jax.ops import compress_kv
from nsa_jax.ops import compressed_attention
from nsa_jax.ops import compressed_attention_and_selection
from nsa_jax.ops import dense_causal_attention
from nsa_jax.ops import nsa_attention
from nsa_jax.ops import nsa_attention_separate_kv
from nsa_jax.ops import select_blocks
from nsa_jax.ops import selected_attention
from nsa_jax.ops import sliding_window_attention

__version__ = "0.1.0"

__all__ = [
    "DecodeCache",
    "IMPLEMENTATIONS",
    "NSAConfig",
    "compress_kv",
    "compressed_attention",
    "compressed_attention_and_selection",
    "dense_causal_attention",
    "init_decode_cache",
    "init_separate_kv_cache",
    "nsa_attention",
    "nsa_attention_separate_kv",
    "nsa_decode_step",
    "nsa_decode_step_separate_kv",
    "nsa_prefill",
    "nsa_prefill_separate_kv",
    "select_blocks",
    "selected_attention",
    "sliding_window_attention",
]
