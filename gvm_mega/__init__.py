"""gvm_mega: GVM-RAFT and GRPO for math reasoning on megatron-core, with SGLang rollouts.

Each iteration spends the sampling budget where it lowers gradient variance most: per-prompt
sample counts n_i ~ G_i / sqrt(p_i + alpha / p_i^(beta-1)).
"""
__version__ = "0.1.0"
