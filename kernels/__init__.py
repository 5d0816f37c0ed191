"""Per-sequence gradient norms without per-sequence gradients ("ghost norms").

For a batch of sequences, one forward and one backward pass give every sequence's squared
gradient norm over the output layer (fused with the log-softmax, vocab read in chunks,
vocab-parallel aware), the input embedding (vocab-parallel aware) or any linear layer.
Two implementations sit behind the functions below: pure torch (CPU default and test
oracle, :mod:`kernels.reference`) and Triton (:mod:`kernels.triton_impl`).
"""
from kernels.dispatch import (
    BACKENDS,
    embedding_sq_norms,
    linear_sq_norms,
    lm_head_sq_norms,
    resolve_backend,
    tied_cross_term,
    triton_available,
)
from kernels.reference import (
    DEFAULT_VOCAB_CHUNK,
    choose_linear_method,
    logprob_grad_of_logits,
    vocab_parallel_logsumexp,
)

__all__ = [
    "BACKENDS", "DEFAULT_VOCAB_CHUNK", "choose_linear_method", "embedding_sq_norms",
    "linear_sq_norms", "lm_head_sq_norms", "logprob_grad_of_logits", "resolve_backend",
    "tied_cross_term", "triton_available", "vocab_parallel_logsumexp",
]
