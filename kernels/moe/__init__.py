"""Mixture-of-experts dispatch kernels: a dense oracle, capacity-based (GShard) dispatch,
dropless grouped-matmul dispatch and dropless expert parallelism. See docs/moe.md, "Dispatch".

Experts are SwiGLU FFNs with stacked weights (`ExpertWeights`); routing (expert_ids [N, k],
combine [N, k]) is the caller's.
"""
from .capacity_dispatch import capacity, capacity_ffn, capacity_slots
from .exchange import EXCHANGES, padded_ragged_all_to_all
from .expert_parallel import expert_parallel_body, expert_parallel_ffn
from .grouped import GMM_IMPLS, dropless_ffn, grouped_matmul
from .reference import ExpertWeights, reference_ffn

__all__ = [
    "ExpertWeights", "reference_ffn",
    "capacity", "capacity_slots", "capacity_ffn",
    "GMM_IMPLS", "grouped_matmul", "dropless_ffn",
    "EXCHANGES", "padded_ragged_all_to_all", "expert_parallel_body", "expert_parallel_ffn",
]
