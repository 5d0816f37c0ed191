"""Everything a run needs, built once per rank: :func:`build_run` returns a :class:`RunSetup`.

All ranks: the parallel layout, tokenizer, policy (and frozen reference for KL), checkpoints,
the gradient-norm estimator. The driver also gets the prompt stream, eval sets, verifier,
rollout engine and run logger. Initial weights come from, in order: the run directory's
latest checkpoint (resume), ``checkpoint.load``, ``model.hf_path``, or a fresh init followed
by the supervised warm start.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

from gvm_mega.data import DataError, PromptStream, build_template, load_prompts
from gvm_mega.trainer.batch import RankSamples
from gvm_mega.trainer.comm import from_driver
from gvm_mega.trainer.warm_start import (run_warm_start_process, sft_pairs, warm_start_dir,
                                         warm_start_ready)


class SetupError(ValueError):
    """A run that cannot start, with the reason worded for the user."""


@dataclasses.dataclass
class RunSetup:
    cfg: Any
    layout: Any
    run_dir: Path
    tokenizer: Any
    template: Any
    policy: Any
    reference: Any
    checkpoints: Any
    loss_spec: Any
    estimator: Any
    resumed: Any = None
    warm_start_s: float = 0.0  # seconds spent on the initial weights (the SFT warm start)
    # driver only
    log: Any = None
    stream: Any = None
    eval_sets: list = dataclasses.field(default_factory=list)
    scorer: Any = None
    engine: Any = None
    sampling: Any = None
    eval_sampling: Any = None

    @property
    def is_driver(self) -> bool:
        return self.layout.is_driver

    @property
    def lr(self) -> float:
        return self.policy.lr

    def encode(self, prompt: Any) -> list[int]:
        return self.tokenizer.encode_prompt(self.template.render(prompt.problem))

    # -------------------------------------------------------------- collective steps
    def grad_norm_estimator(self, pairs: list[tuple[list[int], list[int]]]) -> np.ndarray:
        """Per-response gradient norms of (prompt, response) pairs, DP ranks sharing the work."""
        from megatron.core import parallel_state as ps

        from gvm_mega.gradnorm import distributed_norms, make_batch

        batch = make_batch([p for p, _ in pairs], [r for _, r in pairs],
                           pad_id=self.tokenizer.pad_token_id or 0)
        norms = distributed_norms(self.estimator, batch, ps.get_data_parallel_group())
        return norms.numpy()

    def behaviour_logprobs(self, samples: RankSamples) -> RankSamples:
        """The samples with the policy's (and reference's) log-probs under the weights that
        drew them, measured once before the iteration's first update: every PPO epoch and
        mini-batch takes its importance ratio, and so its clipping, against these (collective)."""
        from gvm_mega.training import SampleBatch

        batch = SampleBatch(samples.sequences, samples.prompt_lengths,
                            advantages=samples.advantages)
        old = self.policy.logprobs(batch).as_lists()
        ref = self.reference.logprobs(batch).as_lists() if self.reference is not None else None
        return dataclasses.replace(samples, old_logprobs=old, ref_logprobs=ref)

    def policy_step(self, part: RankSamples) -> Any:
        """One optimizer step on a mini-batch of samples whose behaviour log-probs are known
        (collective)."""
        from gvm_mega.training import SampleBatch

        if part.old_logprobs is None:
            raise ValueError("policy_step needs the samples' behaviour log-probs: pass them "
                             "through behaviour_logprobs before the first update")
        batch = SampleBatch(part.sequences, part.prompt_lengths, advantages=part.advantages,
                            old_logprobs=part.old_logprobs, ref_logprobs=part.ref_logprobs)
        return self.policy.train_step(batch)

    def sync_weights(self, version: str) -> dict:
        """Stream the policy, in HF layout and in buckets, into the driver's engine (collective).

        Returns the bytes moved; the phase timer records the seconds."""
        from gvm_mega.rollout import sync_weights

        report = sync_weights(self.policy.module, self.engine if self.is_driver else None, version)
        return {"sync_bytes": report.bytes}

    def evaluate(self) -> dict:
        """Held-out metrics on the driver (``eval_accuracy``, ...); {} elsewhere."""
        if not self.is_driver or not self.eval_sets:
            return {}
        from gvm_mega.evaluation import eval_metrics, evaluate

        results = [evaluate(self.engine, self.tokenizer, prompts, self.template,
                            samples=self.cfg.train.eval_samples, sampling=self.eval_sampling,
                            scorer=self.scorer, name=name, seed=self.cfg.run.seed,
                            timeout=self.cfg.reward.timeout_s)
                   for name, prompts in self.eval_sets]
        return eval_metrics(results)

    def save_checkpoint(self, iteration: int, extra_state: Any) -> None:
        self.checkpoints.save(self.policy, iteration, extra_state)

    def close(self) -> None:
        if self.is_driver:
            if callable(getattr(self.engine, "close", None)):
                self.engine.close()  # servers leave the weight update group
            self.scorer.close()
            self.log.close()


def build_run(cfg: Any, run_dir: Optional[str] = None) -> RunSetup:
    from gvm_mega.gradnorm import GradNormEstimator
    from gvm_mega.models import load_hf_into_mcore, mcore_to_hf_state_dict
    from gvm_mega.parallel import init_distributed
    from gvm_mega.runlog import RunLogger, resolve_run_dir
    from gvm_mega.training import CheckpointManager, LossSpec, Policy

    layout = init_distributed(cfg.parallel, seed=cfg.run.seed)
    driver = layout.is_driver
    _resolve_model(cfg)
    tokenizer = _tokenizer(cfg)
    template = build_template(cfg.data.template, tokenizer_dir=_tokenizer_dir(cfg))
    # Fail before minutes of warm start: the data must load and the servers must answer.
    data = _load_data(cfg, tokenizer, template) if driver else None
    if driver and cfg.rollout.engine != "embedded":
        _check_servers(cfg.rollout)
    path = Path(from_driver(str(resolve_run_dir(cfg, run_dir)) if driver else None))
    cfg.run.run_dir = str(path)

    checkpoints = CheckpointManager(path / "checkpoints", keep_last=cfg.checkpoint.keep_last,
                                    hf_side_dir=cfg.model.hf_path, tokenizer=tokenizer)
    policy = Policy.from_config(cfg, pad_id=tokenizer.pad_token_id or 0)
    resumed = checkpoints.load(policy) if cfg.checkpoint.resume else None
    # the first thing written to the run directory: it marks the directory as a run's
    log = RunLogger.start(cfg, path, resume_iteration=resumed.iteration if resumed else None) \
        if driver else None
    start = time.perf_counter()
    if resumed is None:
        _initial_weights(cfg, policy, tokenizer, template, checkpoints, load_hf_into_mcore, log)
    warm_start_s = time.perf_counter() - start
    setup = RunSetup(cfg=cfg, layout=layout, run_dir=path, tokenizer=tokenizer,
                     template=template, policy=policy, reference=None,
                     checkpoints=checkpoints, loss_spec=LossSpec.from_config(cfg.algorithm),
                     estimator=GradNormEstimator.from_config(policy.module, cfg)
                     if cfg.algorithm.uses_gvm else None,
                     resumed=resumed, log=log, warm_start_s=warm_start_s)
    setup.reference = _reference(cfg, policy, path, fresh=resumed is None)
    state = mcore_to_hf_state_dict(policy.module)
    if driver:
        _driver_parts(setup, state, *data)
    return setup


# ---------------------------------------------------------------------- pieces
def _resolve_model(cfg: Any) -> None:
    """With ``model.hf_path``, the architecture comes from its config.json."""
    if cfg.model.hf_path:
        from gvm_mega.models import model_config_from_hf

        hf = model_config_from_hf(cfg.model.hf_path)
        tokenizer = cfg.model.tokenizer if cfg.model.tokenizer != "builtin" else cfg.model.hf_path
        cfg.model = dataclasses.replace(hf, hf_path=cfg.model.hf_path, tokenizer=tokenizer,
                                        params_dtype=cfg.model.params_dtype)


def _tokenizer_dir(cfg: Any) -> Optional[str]:
    return None if cfg.model.tokenizer == "builtin" else cfg.model.tokenizer


def _tokenizer(cfg: Any) -> Any:
    from gvm_mega.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(cfg.model.tokenizer)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise SetupError(f"model.vocab_size ({cfg.model.vocab_size}) is smaller than the "
                         f"tokenizer's vocabulary ({tokenizer.vocab_size})")
    return tokenizer


def _initial_weights(cfg: Any, policy: Any, tokenizer: Any, template: Any,
                     checkpoints: Any, load_hf_into_mcore: Any, log: Any) -> None:
    if cfg.checkpoint.load:
        checkpoints.load(policy, path=cfg.checkpoint.load, load_optimizer=False)
    elif cfg.model.hf_path:
        load_hf_into_mcore(policy.module, cfg.model.hf_path)
    elif cfg.train.warmup_steps > 0:
        _warm_start(cfg, policy, tokenizer, template, log)


def _warm_start(cfg: Any, policy: Any, tokenizer: Any, template: Any, log: Any) -> None:
    """The driver trains the warm start in a one-process child (the same weights whatever
    this run's layout), or finds it done by an earlier attempt; every rank loads it."""
    from gvm_mega.models import load_mcore_checkpoint

    run_dir = Path(cfg.run.run_dir)
    error: Optional[str] = None
    if log is not None:
        if warm_start_ready(run_dir):
            log.info(f"warm start: reusing {warm_start_dir(run_dir)}")
        else:
            error = _train_warm_start(cfg, run_dir, tokenizer, template, log)
    error = from_driver(error)
    if error is not None:
        raise SetupError(error)
    load_mcore_checkpoint(policy.module, warm_start_dir(run_dir))


def _train_warm_start(cfg: Any, run_dir: Path, tokenizer: Any, template: Any,
                      log: Any) -> Optional[str]:
    """Run the warm-start child; an error message instead of an exception (for every rank)."""
    if not sft_pairs(load_prompts(cfg.data.train_path, cfg.data).prompts, template, tokenizer):
        return (f"{cfg.data.train_path}: no worked solutions for the supervised warm start "
                f"(set train.warmup_steps=0, or give checkpoint.load or model.hf_path)")
    bar = log.progress("warm start", total=cfg.train.warmup_steps, unit="step")
    losses: list[float] = []

    def on_step(step: int, loss: float) -> None:
        losses.append(loss)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}")
    try:
        run_warm_start_process(run_dir / "config.yaml", run_dir, on_step=on_step)
    except RuntimeError as exc:
        return str(exc)
    finally:
        if bar is not None:
            bar.close()
    log.info(f"warm start: {cfg.train.warmup_steps} SFT steps in one process, loss "
             f"{np.mean(losses[:10]):.3f} -> {np.mean(losses[-10:]):.3f}")
    return None


def _reference(cfg: Any, policy: Any, run_dir: Path, *, fresh: bool) -> Any:
    """A frozen copy of the starting weights when a KL penalty is on (kept in the run dir)."""
    if cfg.algorithm.kl_coef == 0:
        return None
    from gvm_mega.models import load_mcore_checkpoint, save_mcore_checkpoint
    from gvm_mega.training import Policy

    reference = Policy(cfg.model, trainable=False,
                       micro_batch_tokens=cfg.parallel.micro_batch_tokens,
                       temperature=cfg.rollout.temperature or 1.0)
    where = run_dir / "reference"
    if fresh:
        reference.module.load_state_dict(policy.module.state_dict())
        save_mcore_checkpoint(reference.module, where, cfg.model)
    else:
        load_mcore_checkpoint(reference.module, where)
    return reference


def _load_data(cfg: Any, tokenizer: Any, template: Any) -> tuple[Any, list]:
    """The training prompts and the eval sets (driver), or a SetupError naming the file."""
    try:
        train = load_prompts(cfg.data.train_path, cfg.data, tokenizer=tokenizer, template=template)
        evals = [(spec, load_prompts(spec, cfg.data, tokenizer=tokenizer,
                                     template=template).prompts)
                 for spec in cfg.data.eval_paths]
    except (DataError, OSError) as exc:
        raise SetupError(str(exc)) from exc
    batch = cfg.train.prompts_per_iteration
    if batch > len(train.prompts):
        # A batch would repeat prompts, and GVM needs one observation of a prompt per batch.
        raise SetupError(f"train.prompts_per_iteration ({batch}) is more than the "
                         f"{len(train.prompts)} prompts of data.train_path "
                         f"({cfg.data.train_path}): a batch would repeat prompts")
    return train, evals


def _check_servers(rollout: Any, timeout_s: float = 3.0) -> None:
    """Every rollout URL answers ``/health`` within a few seconds, or a SetupError."""
    import asyncio

    from gvm_mega.rollout import RolloutError, client_from_config

    try:
        client = client_from_config(rollout)
    except ValueError as exc:
        raise SetupError(str(exc)) from None
    try:
        asyncio.run(client.wait_ready(timeout_s=timeout_s))
    except RolloutError as exc:
        raise SetupError(f"rollout server unreachable: {exc} (start the server or fix "
                         f"rollout.urls)") from None


def _driver_parts(setup: RunSetup, hf_state: dict, train: Any, eval_sets: list) -> None:
    from gvm_mega.models import hf_config_from_model_config
    from gvm_mega.reward import RewardScorer
    from gvm_mega.rollout import build_engine, sampling_from_config

    cfg = setup.cfg
    setup.eval_sets = eval_sets
    setup.log.info(f"train prompts: {train.stats.summary()}")
    setup.stream = PromptStream(train.prompts, seed=cfg.run.seed)
    setup.scorer = RewardScorer.from_config(cfg.reward)
    stops = tuple(setup.tokenizer.eos_token_ids)
    setup.sampling = sampling_from_config(cfg.rollout, stop_token_ids=stops)
    greedy = cfg.train.eval_samples == 1
    setup.eval_sampling = setup.sampling.replace(temperature=0.0 if greedy else cfg.rollout.temperature)
    hf_config = hf_config_from_model_config(cfg.model, eos_token_id=setup.tokenizer.eos_token_id)
    setup.engine = build_engine(cfg.rollout, hf_config, hf_state, tokenizer=setup.tokenizer,
                                run_dir=str(setup.run_dir), seed=cfg.run.seed)
    if cfg.rollout.engine != "embedded":
        setup.engine.update_weights(hf_state, "start")
