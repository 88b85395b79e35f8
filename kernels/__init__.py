"""Rank-masked attention and KV-cache ops (``orderlab.kernels``).

The rule (DESIGN.md section 4): key ``j`` is visible to query ``i`` iff
``k_rank[j] < q_rank[i]`` or ``(q_group[i] >= 0 and k_group[j] == q_group[i])``.
CPU tensors run the PyTorch reference; CUDA tensors run Triton when it is available.
"""

from .attention import append_kv, append_kv_reference, set_attention, set_attention_reference, visible

__all__ = ["set_attention", "set_attention_reference", "visible", "append_kv", "append_kv_reference"]
