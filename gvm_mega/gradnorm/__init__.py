"""The G_i estimator: per-response gradient norms of ``log pi(y|x)`` for a batch in one pass.

``GradNormEstimator(model, cfg.gvm.grad_norm_params).norms(make_batch(prompts, responses))``
gives ``||d log pi(y|x) / d theta||`` per response; :func:`prompt_grad_norms` averages them
over each prompt's accepted responses into ``G_i``. :func:`reference_sq_norms` is the
one-response-at-a-time autograd computation it replaces.
"""
from gvm_mega.gradnorm.batch import SequenceBatch, make_batch, micro_batches
from gvm_mega.gradnorm.estimator import GradNormEstimator, default_forward
from gvm_mega.gradnorm.layers import PARAM_SETS, find_layers, select_parameters
from gvm_mega.gradnorm.prompts import (distributed_norms, pool_prompt_grad_norms,
                                      prompt_grad_norms)
from gvm_mega.gradnorm.reference import reference_sq_norms

__all__ = ["GradNormEstimator", "PARAM_SETS", "SequenceBatch", "default_forward",
           "distributed_norms", "find_layers", "make_batch", "micro_batches",
           "pool_prompt_grad_norms", "prompt_grad_norms", "reference_sq_norms",
           "select_parameters"]
