"""Per-prompt sample allocation: GVM (variance-minimising) or uniform, plus what goes with it.

Entry points: :func:`allocate` (the rule), :func:`make_allocator` (GVM or uniform from the
config), :class:`PromptStatsStore` (p_i and G_i across iterations), :func:`diagnose`
(variance proxy against uniform and against the best allocation) and :func:`split_across_ranks` (data-parallel balance).
"""
from gvm_mega.allocation.diagnostics import (
    AllocationDiagnostics,
    best_variance_proxy,
    diagnose,
    gini,
    variance_proxy,
    weighting_of,
)
from gvm_mega.allocation.dp_split import DPSplit, RankShare, split_across_ranks
from gvm_mega.allocation.gvm import (
    DROP_REASONS,
    AllocationResult,
    InfeasibleAllocationError,
    allocate,
    allocate_detailed,
    gvm_weights,
    round_preserving_total,
)
from gvm_mega.allocation.stats import PromptStats, PromptStatsStore
from gvm_mega.allocation.stats_io import StatsFileError, StatsTable, read_stats_jsonl
from gvm_mega.allocation.strategy import (
    Allocator,
    GVMAllocator,
    UniformAllocator,
    make_allocator,
)
from gvm_mega.allocation.uniform import uniform_allocate

__all__ = [
    "DROP_REASONS", "AllocationDiagnostics", "AllocationResult", "Allocator", "DPSplit",
    "GVMAllocator", "InfeasibleAllocationError", "PromptStats", "PromptStatsStore",
    "RankShare", "StatsFileError", "StatsTable", "UniformAllocator", "allocate",
    "allocate_detailed", "best_variance_proxy", "diagnose", "gini", "gvm_weights", "make_allocator",
    "read_stats_jsonl", "round_preserving_total", "split_across_ranks", "uniform_allocate",
    "variance_proxy", "weighting_of",
]
