"""Rank-masked attention and KV-cache ops (``orderlab.kernels``).

The rule (DESIGN.md section 4): key ``j`` is visible to query ``i`` iff
``k_rank[j] < q_rank[i]`` or ``(q_group[i] >= 0 and k_group[j] == q_group[i])``.
CUDA tensors run the Triton kernels, CPU tensors the PyTorch reference (the transformer's
:class:`RankMask` asks for SDPA with a boolean mask instead); ``backend=``,
``use_backend(...)`` or ``ORDERLAB_KERNELS`` override that (``orderlab/kernels/dispatch.py``).
"""

from .attention import (
    RankMask,
    set_attention,
    set_attention_reference,
    set_attention_sdpa,
    set_attention_triton,
    tile_lists,
    tile_stats,
    visible,
    visible_keys,
)
from .cache import append_kv, append_kv_reference, append_kv_triton
from .dispatch import use_backend

__all__ = [
    "set_attention",
    "set_attention_reference",
    "set_attention_triton",
    "set_attention_sdpa",
    "RankMask",
    "visible",
    "visible_keys",
    "tile_stats",
    "tile_lists",
    "append_kv",
    "append_kv_reference",
    "append_kv_triton",
    "use_backend",
]
