"""The one typed config schema of the trainer.

Each section is a dataclass; :class:`Config` holds one of each. Values come from YAML files
and ``section.key=value`` overrides (see :mod:`gvm_mega.config.loader`), which validates
types and the bounds declared here with :func:`option`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from gvm_mega.config.fields import option

@dataclass
class RunConfig:
    name: str = option("gvm", help="run name, used in the default run directory")
    seed: int = option(1234, ge=0, help="global seed for data order, sampling and init")
    run_dir: Optional[str] = option(None, help="run directory; default runs/<name>-<timestamp>")


@dataclass
class TrainConfig:
    iterations: int = option(10, ge=0, help="GVM iterations (each ends with policy steps)")
    prompts_per_iteration: int = option(16, ge=1, help="prompts in one GVM batch (m)")
    warmup_steps: int = option(0, ge=0, help="supervised warm-start steps before RL (0: none)")
    warmup_lr: float = option(1e-3, gt=0, help="learning rate of the supervised warm start")
    warmup_batch_size: int = option(32, ge=1, help="(problem, solution) pairs per warm-start step")
    eval_every: int = option(0, ge=0, help="evaluate every k iterations (0: only first and last)")
    eval_samples: int = option(1, ge=1, help="samples per eval prompt (mean@k, pass@k)")


@dataclass
class ModelConfig:
    arch: Literal["tiny", "llama", "qwen2"] = option(
        "tiny", help="architecture family (all: RMSNorm, SwiGLU, GQA, RoPE); 'tiny' is the CPU "
                     "demo preset, Qwen2-style with QKV bias")
    hf_path: Optional[str] = option(None, help="HF checkpoint directory to start from")
    num_layers: int = option(2, ge=1)
    hidden_size: int = option(64, ge=1)
    ffn_hidden_size: int = option(172, ge=1)
    num_attention_heads: int = option(4, ge=1)
    num_query_groups: int = option(2, ge=1, help="key/value heads (grouped-query attention)")
    vocab_size: int = option(512, ge=2)
    max_position_embeddings: int = option(512, ge=1)
    rope_theta: float = option(10000.0, gt=0)
    norm_epsilon: float = option(1e-6, gt=0)
    head_dim: Optional[int] = option(None, ge=1, help="per-head size; default hidden/heads")
    qkv_bias: Optional[bool] = option(
        None, help="bias on the QKV projection; default by arch: on for qwen2 and tiny, off for llama")
    tie_word_embeddings: bool = option(True, help="share input embedding and output layer")
    params_dtype: Literal["float32", "bfloat16", "float16"] = option("float32")
    tokenizer: str = option("builtin", help="'builtin' (sentencepiece, trained on the task) "
                                            "or a directory with tokenizer.json")


@dataclass
class ParallelConfig:
    tp: int = option(1, ge=1, help="tensor-parallel size")
    pp: int = option(1, ge=1, help="pipeline-parallel size")
    dp: Optional[int] = option(None, ge=1, help="data-parallel size; default world / (tp * pp)")
    backend: Literal["auto", "gloo", "nccl"] = option("auto", help="auto: nccl with CUDA, else gloo")
    micro_batch_tokens: int = option(4096, ge=1, help="token budget of one packed micro-batch")


@dataclass
class DataConfig:
    train_path: str = option("builtin:arithmetic", help="JSONL/parquet file, or builtin:arithmetic")
    eval_paths: list[str] = option(default_factory=lambda: ["builtin:arithmetic-test"],
                                   help="held-out sets evaluated on schedule")
    prompt_field: str = option("problem")
    answer_field: str = option("answer")
    id_field: Optional[str] = option(None, help="field holding a stable prompt id; else content hash")
    template: Literal["qwen-math-cot", "plain", "hf-chat"] = option("plain")
    max_prompt_length: int = option(256, ge=1, help="prompts longer than this (tokens) are dropped")
    dedupe: bool = option(True)
    on_bad_row: Literal["error", "skip"] = option("error", help="malformed rows: fail or skip and count")
    arithmetic_train_size: int = option(20000, ge=1, help="problems in builtin:arithmetic")
    arithmetic_test_size: int = option(500, ge=1, help="problems in builtin:arithmetic-test")
    arithmetic_seed: int = option(0, ge=0, help="seed of the built-in task's problems")
    arithmetic_min_level: int = option(0, ge=0, le=9, help="easiest built-in difficulty level")
    arithmetic_max_level: int = option(9, ge=0, le=9, help="hardest built-in difficulty level")
    arithmetic_solutions: Literal["in-order", "any-order"] = option(
        "in-order", help="built-in worked solutions: left to right (one correct path per "
                         "problem), or terms in any order (several)")
    arithmetic_worked_max_level: Optional[int] = option(
        None, ge=0, le=9, help="hardest built-in level whose problems keep their worked "
                               "solutions (default: every level); harder problems stay in the "
                               "RL prompts and the eval but not in the supervised warm start, "
                               "like problems beyond a model's reach in a real dataset")


@dataclass
class RolloutConfig:
    engine: Literal["embedded", "sglang"] = option("embedded")
    urls: list[str] = option(default_factory=list, help="SGLang server or router URLs")
    temperature: float = option(1.0, ge=0)
    top_p: float = option(1.0, gt=0, le=1)
    top_k: int = option(-1, ge=-1, help="-1 disables top-k")
    max_new_tokens: int = option(128, ge=1)
    stop: list[str] = option(default_factory=list)
    concurrency: int = option(64, ge=1, help="requests in flight per client")
    request_timeout_s: float = option(600.0, gt=0)
    max_retries: int = option(3, ge=0, help="failed attempts retried per request (errors, 5xx)")
    retry_backoff_s: float = option(0.2, gt=0, help="first retry delay; doubles per attempt")
    max_abort_resubmits: int = option(8, ge=0, help="resubmissions of aborted samples")
    max_n_per_request: int = option(64, ge=1, help="samples per HTTP request (unseeded prompts)")
    worker_urls: list[str] = option(default_factory=list,
                                    help="servers behind a router, for weight updates "
                                         "(default: urls)")
    weights_dir: Optional[str] = option(None, help="directory servers can read, where weights "
                                                   "are written each step; default run_dir/weights")
    check_weight_version: bool = option(True, help="fail when a reply's weight_version is stale")
    weight_sync: Literal["disk", "distributed"] = option(
        "disk", help="sglang engine: weights to servers as safetensors in weights_dir "
                     "(/update_weights_from_disk), or broadcast bucket by bucket from the driver "
                     "through a process group the servers join (/update_weights_from_distributed)")
    weight_sync_backend: Literal["auto", "gloo", "nccl"] = option(
        "auto", help="distributed weight sync: process-group backend (auto: nccl with CUDA, "
                     "else gloo)")
    weight_sync_master_address: Optional[str] = option(
        None, help="distributed weight sync: the driver's address as servers reach it "
                   "(default: loopback for local servers, else the route to the first server)")
    weight_sync_timeout_s: float = option(
        300.0, gt=0, help="distributed weight sync: limit on joining the group and on each bucket")
    max_batch_size: int = option(64, ge=1, help="embedded engine: samples decoded together")


@dataclass
class RewardConfig:
    timeout_s: float = option(5.0, gt=0, help="hard wall-clock limit per verification")
    workers: int = option(2, ge=1, help="verifier worker processes")
    fallback: Literal["none", "last-number"] = option(
        "none", help="answer extraction when no \\boxed{} is present")
    max_answer_chars: int = option(1000, ge=1, help="longer extracted answers score 0 unverified")
    memory_mb: int = option(4096, ge=0, help="address-space cap per verifier worker (0: none)")
    cache_size: int = option(100000, ge=0, help="(answer, gold) verdicts kept in the cache")
    check_steps: bool = option(
        False, help="built-in task: a training sample also needs every 'Step k: a op b = c' "
                    "line true, each starting from the last result (a right answer after a "
                    "wrong step scores 0); evaluation scores answers only")


# gvm keys the per-iteration estimator has no use for: setting one without the posterior
# estimator is an error rather than a silent no-op.
POSTERIOR_ONLY = ("prior_a", "prior_b", "prior", "grad_norm_ema", "grad_norm_fallback",
                  "grad_norm_shrink", "rates_from_stage2", "presample_until",
                  "stage2_rounds")


@dataclass
class GVMConfig:
    presample_n: int = option(8, ge=1, help="N': stage-1 samples per prompt")
    budget_per_prompt: float = option(8.0, gt=0, help="stage-2 budget N = this * prompts")
    alpha: float = option(1e-3, ge=0, help="regulariser weight in n ~ G/sqrt(p + alpha/p^(beta-1))")
    beta: float = option(2.0, help="regulariser exponent")
    filter_threshold: Optional[float] = option(None, ge=0, le=1,
                                               help="drop prompts with p above this")
    filter_insufficient: Optional[float] = option(
        None, ge=0, help="drop prompts whose expected accepted count p*n is below this")
    skip_solved_above: Optional[float] = option(
        None, ge=0, le=1, help="pass over prompts whose estimated p from earlier visits is "
                               "above this (no samples at all); the batch is filled from the "
                               "stream instead")
    skip_recheck_every: Optional[int] = option(
        None, ge=1, help="with skip_solved_above: a prompt called solved is still visited in "
                         "one epoch of every this many (staggered by prompt), so a prompt the "
                         "policy forgets is noticed; null never revisits")
    min_samples: int = option(0, ge=0, help="floor on n_i for eligible prompts")
    max_samples: Optional[int] = option(None, ge=1, help="cap on n_i (excess redistributed)")
    estimator: Literal["per-iteration", "posterior"] = option(
        "per-iteration", help="p and G from this iteration, or Beta posterior / EMA across iterations")
    prior_a: float = option(1.0, gt=0, help="Beta prior a (accepts) for the posterior estimator")
    prior_b: float = option(1.0, gt=0, help="Beta prior b (rejects) for the posterior estimator")
    prior: Literal["fixed", "fitted"] = option(
        "fixed", help="posterior: the Beta prior of p, prior_a/prior_b as given, or fitted to "
                      "every prompt's latest observation each iteration (empirical Bayes; "
                      "prior_a/prior_b until 16 prompts are known)")
    grad_norm_ema: float = option(0.5, ge=0, lt=1, help="weight of the old G in the EMA")
    grad_norm_average: Literal["mean", "rms"] = option(
        "mean", help="G_i from a prompt's accepted samples' gradient norms: their mean, or "
                     "their root mean square (the scale of their variance)")
    grad_norm_fallback: Literal["mean", "similar-p"] = option(
        "mean", help="posterior: G for a prompt never accepted, the mean over all known prompts "
                     "or over the 16 nearest in estimated p")
    grad_norm_shrink: float = option(
        0.0, ge=0, help="posterior: pseudo-observations of the pooled G mixed into each "
                        "observed G (log space); 0 keeps the observed G")
    rates_from_stage2: bool = option(
        False, help="posterior: stage 2's verified samples count toward p_i too (the next "
                    "visit's estimate and skip_solved_above), not only the pre-samples")
    presample_until: Optional[int] = option(
        None, ge=1, help="posterior: pre-sample a prompt only while the statistics hold fewer "
                         "than this many of its draws; later visits are allocated from the "
                         "statistics and their N' samples go to stage 2's budget")
    stage2_rounds: int = option(
        1, ge=1, help="posterior: draw stage 2 in this many rounds; each round's verdicts and "
                      "gradient norms refine p_i and G_i before the budget left is allocated "
                      "(max_samples caps each round's draw; needs rates_from_stage2)")
    shuffle_allocation: bool = option(
        False, help="control experiment: the rule's stage-2 counts go to the iteration's "
                    "prompts in a random order (same spread of the budget, random targets)")
    grad_norm_params: Literal["embedding", "lm_head", "linear"] = option(
        "embedding", help="parameter set whose per-sequence gradient norm gives G_i")
    reuse_stage1: bool = option(False, help="add stage-1 samples to the training batch")
    count_stage1: bool = option(
        False, help="with reuse_stage1: the rule sets each prompt's N' + n_i, so a prompt whose "
                    "pre-samples already cover its share gets no more")


@dataclass
class AlgorithmConfig:
    name: Literal["raft", "raft++", "grpo", "gvm-raft++", "gvm-grpo"] = option("gvm-raft++")
    uniform_n: int = option(8, ge=1, help="samples per prompt for the uniform algorithms")
    clip_low: float = option(0.2, ge=0, help="PPO clip: ratio >= 1 - clip_low")
    clip_high: float = option(0.2, ge=0, help="PPO clip: ratio <= 1 + clip_high")
    kl_coef: float = option(0.0, ge=0, help="KL penalty to the frozen reference policy")
    entropy_coef: float = option(0.0, help="entropy bonus")
    loss_agg: Literal["token-mean", "seq-mean"] = option("token-mean")
    prompt_weight: Literal["pooled", "prompt-mean", "per-draw"] = option(
        "pooled", help="pooled: each kept sample weighs alike, so a prompt weighs by its count; "
                       "prompt-mean: each prompt weighs alike; per-draw: samples weigh "
                       "1/n_i, so a prompt weighs by its acceptance rate whatever n_i "
                       "(RAFT++/GRPO)")
    grpo_std_norm: bool = option(True, help="False gives Dr.GRPO (no std normalisation)")
    ppo_epochs: int = option(1, ge=1)
    mini_batches: int = option(1, ge=1, help="optimizer steps per iteration per epoch")

    @property
    def uses_gvm(self) -> bool:
        return self.name.startswith("gvm-")


@dataclass
class OptimConfig:
    lr: float = option(1e-6, gt=0)
    min_lr: float = option(0.0, ge=0)
    weight_decay: float = option(0.0, ge=0)
    adam_beta1: float = option(0.9, ge=0, lt=1)
    adam_beta2: float = option(0.999, ge=0, lt=1)
    adam_eps: float = option(1e-8, gt=0)
    clip_grad: float = option(1.0, ge=0, help="global grad-norm clip (0 disables)")
    warmup_steps: int = option(0, ge=0)
    schedule: Literal["constant", "cosine"] = option("constant")


@dataclass
class CheckpointConfig:
    save_every: int = option(0, ge=0, help="save every k iterations (0: only at the end)")
    keep_last: int = option(2, ge=1)
    resume: bool = option(True, help="continue from the run directory's latest checkpoint")
    load: Optional[str] = option(None, help="checkpoint directory to initialise from")


@dataclass
class LoggingConfig:
    tensorboard: bool = option(True)
    wandb_project: Optional[str] = option(None)
    progress_bars: bool = option(True)


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    gvm: GVMConfig = field(default_factory=GVMConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
