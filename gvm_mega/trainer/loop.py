"""The GVM-RAFT iteration loop.

Every rank runs :meth:`Trainer.run`. The driver (global rank 0) owns the prompt stream, the
rollout engine, the verifier and the allocator; the policy is sharded over all ranks, so the
gradient-norm pass, the policy update, the weight gather and checkpoints are collective.
Decisions made on the driver reach the other ranks through :func:`from_driver`.

One iteration (DESIGN.md):

1. stage 1  — N' samples per prompt, verified: acceptance rates p_i
2. G_i      — per-response gradient norms of the accepted samples (one batched pass)
3. allocate — n_i ~ G_i / sqrt(p_i + alpha / p_i^(beta-1)) under the budget N
4. stage 2  — n_i samples per prompt, verified (optionally counted into p_i too); with
               ``gvm.stage2_rounds`` in rounds, re-allocating what is left after each
5. update   — RAFT++ / GRPO policy steps on the stage-2 (optionally + stage-1) samples
6. sync     — new weights to the rollout engine; eval and checkpoint on schedule

Uniform algorithms (raft, raft++, grpo) skip stages 1-3 and give every prompt the same n.
"""
from __future__ import annotations

import time
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch

from gvm_mega.allocation import (AllocationResult, InfeasibleAllocationError, PromptStatsStore,
                                 diagnose, make_allocator, round_preserving_total, weighting_of)
from gvm_mega.gradnorm import pool_prompt_grad_norms, prompt_grad_norms
from gvm_mega.trainer.batch import RankSamples, mini_batches, training_samples
from gvm_mega.trainer.comm import from_driver
from gvm_mega.trainer.sampling import Group, sample_and_score
from gvm_mega.trainer.setup import RunSetup, build_run


@dataclass
class Stage1:
    """What pre-sampling measured: acceptance rates and gradient norms per prompt."""

    groups: list[Group]
    accept_rates: np.ndarray
    grad_norms: np.ndarray
    counts: np.ndarray  # pre-samples drawn per prompt (0: estimated from earlier visits)
    measured: Optional[np.ndarray] = None  # this visit's G_i from the pre-samples (0: none)


PHASES = ("stage1", "grad_norm", "allocate", "stage2", "train", "sync")
MAX_SKIPS = 4  # gvm.skip_solved_above passes over at most this many prompts per batch slot


class PhaseTimer:
    """Seconds per phase (``time_<phase>_s``), shown as a progress bar over the phases."""

    def __init__(self, bar: Any = None) -> None:
        self.seconds: dict[str, float] = {}
        self.bar = bar

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        if self.bar is not None:
            self.bar.set_description(phase)
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[f"time_{phase}_s"] = time.perf_counter() - start
            if self.bar is not None:
                self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class Trainer:
    def __init__(self, cfg: Any, run_dir: Optional[str] = None) -> None:
        self.cfg = cfg
        self.run: RunSetup = build_run(cfg, run_dir)
        self.allocator = make_allocator(cfg)
        self.stats = PromptStatsStore.from_config(cfg.gvm)
        self.samples_total = 0
        self.tokens_generated = 0
        self.round_counts: list[np.ndarray] = []  # stage 2's counts per round, this iteration
        self.start_iteration = self._resume()

    # ------------------------------------------------------------------ the loop
    def train(self) -> Path:
        """Run the remaining iterations; returns the run directory."""
        run, cfg = self.run, self.cfg
        if self.run.resumed is None:
            start = time.perf_counter()
            record = {"iteration": 0, "samples_total": 0, "tokens_generated": 0,
                      **self.evaluate(), "time_eval_s": time.perf_counter() - start,
                      "time_warm_start_s": run.warm_start_s}
            if run.is_driver:
                run.log.log_iteration(record)
            self.save_checkpoint(0)
        last = cfg.train.iterations
        for iteration in range(self.start_iteration + 1, last + 1):
            record = self.iteration(iteration)
            if iteration == last or (cfg.train.eval_every and iteration % cfg.train.eval_every == 0):
                start = time.perf_counter()
                record.update(self.evaluate(), time_eval_s=time.perf_counter() - start)
            if run.is_driver:
                run.log.log_iteration(record)
            if iteration == last or (cfg.checkpoint.save_every
                                     and iteration % cfg.checkpoint.save_every == 0):
                self.save_checkpoint(iteration)
        run.close()
        return run.run_dir

    def iteration(self, it: int) -> dict:
        """One GVM iteration; returns its metrics record (meaningful on the driver)."""
        timer = PhaseTimer(self.run.log.progress(f"iteration {it}", total=len(PHASES),
                                                 unit="phase") if self.run.is_driver else None)
        prompts = self.next_prompts() if self.run.is_driver else []
        with timer("stage1"):
            stage1 = self.presample(prompts, it) if self.allocator.needs_statistics else None
        with timer("grad_norm"):
            if stage1 is not None:
                stage1.grad_norms = stage1.measured = self.grad_norms(stage1.groups)
        with timer("allocate"):
            allocation = self.allocate(prompts, stage1)
        with timer("stage2"):
            allocation, stage2 = self.draw_stage2(prompts, stage1, allocation, it)
            if stage1 is None and self.cfg.gvm.skip_solved_above is not None:
                self.observe(prompts, stage2)
        with timer("train"):
            train_groups = merge_groups(stage1.groups, stage2) \
                if stage1 is not None and self.cfg.gvm.reuse_stage1 else stage2
            step = self.update_policy(train_groups)
        with timer("sync"):
            sync = self.sync_weights(f"iter-{it}")
        timer.close()
        record = self.record(it, prompts, stage1, allocation, stage2, step, timer)
        return {**record, **sync} if record else record

    # ------------------------------------------------------------------ phases
    def next_prompts(self) -> list:
        """The iteration's prompts (driver). With ``gvm.skip_solved_above`` the stream passes
        over prompts the statistics already call solved: their pre-samples would buy almost
        nothing (p near 1, small G), so the batch's budget goes to prompts with signal."""
        size, limit = self.cfg.train.prompts_per_iteration, self.cfg.gvm.skip_solved_above
        if limit is None:
            return self.run.stream.next_batch(size)
        stream, recheck = self.run.stream, self.cfg.gvm.skip_recheck_every

        def solved(prompt) -> bool:
            rate = self.stats.accept_rate(prompt.id)
            return (rate is not None and rate > limit
                    and not rechecked(prompt.id, stream.epoch, recheck))

        return self.run.stream.next_batch(size, skip=solved, max_skips=MAX_SKIPS * size)

    def presample(self, prompts: list, it: int) -> Stage1:
        """Stage 1 (driver): N' verified samples per prompt; p_i = accepted / N'. With
        ``gvm.presample_until`` a prompt the statistics already know well is not pre-sampled."""
        n, until = self.cfg.gvm.presample_n, self.cfg.gvm.presample_until
        counts = np.array([0 if until is not None and self.stats.draws(p.id) >= until else n
                           for p in prompts], dtype=np.int64)
        groups = self.sample(prompts, counts, it, "stage1")
        accepts = np.array([g.num_accepted for g in groups], dtype=np.float64) / np.maximum(
            counts, 1)
        return Stage1(groups, accepts, np.zeros(len(groups)), counts)

    def grad_norms(self, groups: list[Group]) -> np.ndarray:
        """G_i over prompt i's accepted samples (collective); ``gvm.grad_norm_average`` says
        how the per-response norms are averaged."""
        accepted = from_driver([(g.prompt_ids, r) for i, g in enumerate(groups)
                                for r in g.accepted_responses] if self.run.is_driver else None)
        owners = from_driver([i for i, g in enumerate(groups) for _ in g.accepted_responses]
                             if self.run.is_driver else None)
        num_prompts = from_driver(len(groups) if self.run.is_driver else None)
        if not accepted:
            return np.zeros(num_prompts)
        norms = torch.as_tensor(np.asarray(self.run.grad_norm_estimator(accepted)))
        return prompt_grad_norms(norms, owners, num_prompts,
                                 average=self.cfg.gvm.grad_norm_average).numpy()

    def allocate(self, prompts: list, stage1: Optional[Stage1]) -> AllocationResult:
        """n_i for every prompt (driver): GVM from the statistics, or uniform; with
        ``gvm.shuffle_allocation`` the rule's counts go to the prompts in a random order."""
        result = self.rule_allocation(prompts, stage1)
        if stage1 is not None and self.cfg.gvm.shuffle_allocation and self.run.is_driver:
            result = shuffled(result, [p.id for p in prompts], self.cfg.run.seed)
        return result

    def rule_allocation(self, prompts: list, stage1: Optional[Stage1]) -> AllocationResult:
        if not self.run.is_driver:
            return AllocationResult(samples=np.zeros(0, dtype=np.int64),
                                    reasons=np.zeros(0, dtype=np.int8), continuous=np.zeros(0))
        m = len(prompts)
        if stage1 is None:
            return self.allocator.allocate(m, self.allocator.budget(m))
        ids = np.array([p.id for p in prompts], dtype=object)
        drew = stage1.counts > 0
        accepted = np.array([g.num_accepted for g in stage1.groups], dtype=np.int64)
        if drew.any():
            self.stats.update(ids[drew].tolist(), stage1.counts[drew], accepted[drew],
                              np.where(accepted > 0, stage1.grad_norms, np.nan)[drew])
        grad_norms, accept_rates = self.stats.estimates(ids.tolist())
        stage1.grad_norms, stage1.accept_rates = grad_norms, accept_rates
        # pre-samples not drawn (gvm.presample_until) are stage 2's to spend
        skipped_presamples = int(self.cfg.gvm.presample_n * m - stage1.counts.sum())
        budget = self.allocator.budget(m) + skipped_presamples
        return self.allocate_budget(budget, grad_norms, accept_rates, self.drawn(stage1))

    def allocate_budget(self, budget: int, grad_norms: np.ndarray, accept_rates: np.ndarray,
                        drawn: np.ndarray | int) -> AllocationResult:
        """The rule's counts for ``budget`` new samples; when ``gvm.max_samples`` leaves too
        few eligible prompts to spend it all, as much of it as fits."""
        m, cap = len(grad_norms), self.cfg.gvm.max_samples
        try:
            return self.allocator.allocate(m, budget, grad_norms, accept_rates, drawn=drawn)
        except InfeasibleAllocationError:
            if cap is None:
                raise
        # too few eligible prompts to spend the budget under max_samples: spend what fits
        for eligible in range(min(m, budget // cap), -1, -1):
            try:
                result = self.allocator.allocate(m, cap * eligible, grad_norms, accept_rates,
                                                 drawn=drawn)
            except InfeasibleAllocationError:
                continue
            self.run.log.warning(f"budget {budget} exceeds gvm.max_samples={cap} x the eligible "
                                 f"prompts; allocated {cap * eligible}")
            return result
        raise AssertionError("a zero budget is always feasible")

    def draw_stage2(self, prompts: list, stage1: Optional[Stage1], allocation: AllocationResult,
                    it: int) -> tuple[AllocationResult, list[Group]]:
        """Stage 2's samples and the counts actually drawn (collective with rounds).

        With ``gvm.stage2_rounds`` = R > 1 the budget is drawn in R rounds: each draws its
        part of the rule's counts for the budget left, and its verdicts (p_i) and accepted
        responses' gradient norms (G_i) refine the estimates before the rule allocates the
        rest, so a prompt its pre-samples misjudged is corrected while budget is left to move.
        """
        rounds = self.cfg.gvm.stage2_rounds if stage1 is not None else 1
        count = stage1 is not None and self.cfg.gvm.rates_from_stage2
        left = int(allocation.samples.sum())
        given = np.zeros(len(prompts), dtype=np.int64)
        measured = (stage1.measured, np.array([g.num_accepted for g in stage1.groups])) \
            if rounds > 1 else None
        groups: list[Group] = []
        self.round_counts = []
        for r in range(rounds):
            if r:
                allocation = self.reallocate(prompts, stage1, given, left)
            part = allocation.samples if r == rounds - 1 else \
                part_of(allocation.samples, left // (rounds - r))
            drawn = self.sample(prompts, part, it, "stage2" if r == 0 else f"stage2-round{r + 1}")
            given, left = given + part, left - int(part.sum())
            self.round_counts.append(part)
            groups = merge_groups(groups, drawn) if r else drawn
            if count:
                self.count_stage2(prompts, drawn)
            if r < rounds - 1:
                measured = self.refine_grad_norms(prompts, drawn, *measured)
        if rounds > 1:
            allocation = AllocationResult(samples=given, reasons=allocation.reasons,
                                          continuous=allocation.continuous)
        return allocation, groups

    def refine_grad_norms(self, prompts: list, drawn: list[Group], norms: np.ndarray,
                          accepted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """This visit's G_i over its accepted responses so far, the round's ``drawn`` added,
        into the statistics (collective); returns the pooled norms and accepted counts."""
        round_norms = self.grad_norms(drawn)
        if not self.run.is_driver:
            return norms, accepted
        round_accepted = np.array([g.num_accepted for g in drawn], dtype=np.int64)
        pooled = pool_prompt_grad_norms(norms, accepted, round_norms, round_accepted,
                                        average=self.cfg.gvm.grad_norm_average)
        self.stats.revise_grad_norms([p.id for p in prompts], pooled)
        return np.nan_to_num(pooled, nan=0.0), accepted + round_accepted

    def reallocate(self, prompts: list, stage1: Stage1, given: np.ndarray,
                   left: int) -> AllocationResult:
        """The rule's counts for the ``left`` samples of stage 2 from the refined estimates,
        every sample drawn so far counted as drawn (driver)."""
        if not self.run.is_driver:
            return self.rule_allocation(prompts, stage1)   # empty off the driver
        grad_norms, accept_rates = self.stats.estimates([p.id for p in prompts])
        stage1.grad_norms, stage1.accept_rates = grad_norms, accept_rates
        return self.allocate_budget(left, grad_norms, accept_rates, self.drawn(stage1) + given)

    def drawn(self, stage1: Stage1) -> np.ndarray | int:
        """Pre-samples per prompt the rule counts as already drawn (``gvm.count_stage1``)."""
        return stage1.counts if self.cfg.gvm.count_stage1 else 0

    def observe(self, prompts: list, groups: list[Group]) -> None:
        """A uniform algorithm's verdicts into the statistics (driver), so that
        ``gvm.skip_solved_above`` can pass over solved prompts without any allocation."""
        drawn = [(p.id, len(g.samples), g.num_accepted) for p, g in zip(prompts, groups)
                 if g.samples]
        if self.run.is_driver and drawn:
            ids, counts, accepted = zip(*drawn)
            self.stats.update(list(ids), list(counts), list(accepted))

    def count_stage2(self, prompts: list, stage2: list[Group]) -> None:
        """Stage 2's verdicts into the statistics' p_i (driver): they are free, and a prompt
        the allocation favoured is then known from many draws, not only its N' pre-samples."""
        if self.run.is_driver:
            self.stats.add_counts([p.id for p in prompts], [len(g.samples) for g in stage2],
                                  [g.num_accepted for g in stage2])

    def sample(self, prompts: list, counts, it: int, stage: str) -> list[Group]:
        """Verified samples (driver only; other ranks get an empty list)."""
        if not self.run.is_driver:
            return []
        run = self.run
        groups = sample_and_score(run.engine, run.scorer, run.tokenizer, prompts,
                                  [run.encode(p) for p in prompts], counts, run.sampling,
                                  seed=self.cfg.run.seed, iteration=it, stage=stage,
                                  check_steps=self.cfg.reward.check_steps)
        self.samples_total += sum(len(g.samples) for g in groups)
        self.tokens_generated += sum(len(s.output_ids) for g in groups for s in g.samples)
        return groups

    def update_policy(self, groups: list[Group]) -> Optional[dict]:
        """PPO epochs x mini-batches of policy steps on this rank's share (collective)."""
        run, algo = self.run, self.cfg.algorithm
        shares = from_driver(training_samples(groups, run.loss_spec, run.layout.dp)
                             if run.is_driver else None)
        per_rank, imbalance = shares
        if sum(len(s) for s in per_rank) == 0:
            return None
        mine: RankSamples = run.behaviour_logprobs(per_rank[run.layout.dp_rank])
        # no more mini-batches than the smallest rank has samples (a step needs data)
        count = max(1, min(algo.mini_batches, min(len(s) for s in per_rank)))
        reports = []
        for _ in range(algo.ppo_epochs):
            for part in mini_batches(mine, count):
                reports.append(run.policy_step(part))
        applied = [r for r in reports if not r.skipped]
        if len(applied) < len(reports) and run.is_driver:
            reasons = sorted({r.reason for r in reports if r.skipped})
            run.log.warning(f"skipped {len(reports) - len(applied)} of {len(reports)} policy "
                            f"steps: {'; '.join(reasons)}")

        def mean(key: str) -> Optional[float]:
            values = [r.metrics.get(key) for r in applied if r.metrics.get(key) is not None]
            return float(np.mean(values)) if values else None
        return {"loss": float(np.mean([r.loss for r in applied])) if applied else None,
                "kl": mean("kl"), "entropy": mean("entropy"),
                "clip_fraction": mean("clip_fraction"),
                "policy_grad_norm": float(np.mean([r.grad_norm for r in applied])) if applied else None,
                "steps_skipped": len(reports) - len(applied), "dp_imbalance": imbalance}

    def sync_weights(self, version: str) -> dict:
        """New weights to the rollout engine; returns the bytes moved."""
        return self.run.sync_weights(version)

    def evaluate(self) -> dict:
        return self.run.evaluate()

    # ------------------------------------------------------------------ bookkeeping
    def record(self, it: int, prompts: list, stage1: Optional[Stage1],
               allocation: AllocationResult, stage2: list[Group], step: Optional[dict],
               timer: PhaseTimer) -> dict:
        if not self.run.is_driver:
            return {}
        drawn = merge_groups(stage1.groups, stage2) if stage1 is not None else stage2
        # train reward: per prompt, the accepted fraction of all its responses this iteration
        rates = [float(np.mean(g.rewards)) for g in drawn if g.rewards]
        samples = allocation.samples
        out = {"iteration": it, "samples_total": self.samples_total,
               "tokens_generated": self.tokens_generated,
               "accept_rate_mean": float(np.mean(rates)) if rates else None,
               "accepted_distinct_frac": accepted_distinct_fraction(drawn),
               "unsound_frac": unsound_fraction(drawn) if self.cfg.reward.check_steps else None,
               "alloc_min": int(samples.min()) if samples.size else None,
               "alloc_max": int(samples.max()) if samples.size else None,
               "prompts_skipped": self.run.stream.last_skipped,
               "lr": self.run.lr, **(step or {"loss": None, "kl": None, "entropy": None}),
               **timer.seconds}
        if stage1 is not None:
            diag = diagnose(samples, stage1.grad_norms, stage1.accept_rates, allocation.reasons,
                            drawn=self.drawn(stage1),
                            weighting=weighting_of(self.cfg.algorithm.prompt_weight))
            seen = stage1.grad_norms[stage1.accept_rates > 0]
            if self.cfg.gvm.estimator == "posterior":   # fitted with gvm.prior=fitted
                out["prior_a"], out["prior_b"] = self.stats.prior()
            out.update(prompts_presampled=int(np.count_nonzero(stage1.counts)),
                       presample_accept_rate_mean=float(np.mean(stage1.accept_rates)),
                       grad_norm_mean=float(np.mean(seen)) if seen.size else None,
                       variance_ratio=diag.variance_ratio,
                       variance_ratio_best=diag.best_variance_ratio, alloc_gini=diag.n_gini)
            ids = [p.id for p in prompts]
            rounds = dict(zip(ids, np.stack(self.round_counts, axis=1).tolist())) \
                if len(self.round_counts) > 1 else None
            self.run.log.log_allocation(it, dict(zip(ids, samples.tolist())),
                                        accept_rate=dict(zip(ids, stage1.accept_rates.tolist())),
                                        grad_norm=dict(zip(ids, stage1.grad_norms.tolist())),
                                        rounds=rounds)
        else:
            out.update(grad_norm_mean=None, variance_ratio=None, variance_ratio_best=None)
            self.run.log.log_allocation(it, {p.id: n for p, n in zip(prompts, samples.tolist())})
        return out

    def save_checkpoint(self, iteration: int) -> None:
        extra = {"stats": self.stats.state_dict(), "stream": self.run.stream.state_dict(),
                 "samples_total": self.samples_total,
                 "tokens_generated": self.tokens_generated} if self.run.is_driver else None
        self.run.save_checkpoint(iteration, extra)

    def _resume(self) -> int:
        """The last completed iteration of a checkpoint in the run directory, or 0."""
        loaded = self.run.resumed
        if loaded is None:
            return 0
        if self.run.is_driver and loaded.extra_state:
            state = loaded.extra_state
            self.stats.load_state_dict(state["stats"])
            self.run.stream.load_state_dict(state["stream"])
            self.samples_total = state["samples_total"]
            self.tokens_generated = state["tokens_generated"]
        return loaded.iteration


def rechecked(prompt_id: str, epoch: int, every: Optional[int]) -> bool:
    """Whether ``gvm.skip_recheck_every`` visits a prompt called solved in this epoch: one
    epoch in ``every``, offset per prompt by a stable hash of its id so that the rechecks of a
    pool are spread over the epochs instead of arriving all at once."""
    return every is not None and (epoch + zlib.crc32(prompt_id.encode("utf-8"))) % every == 0


def part_of(samples: np.ndarray, total: int) -> np.ndarray:
    """``samples`` scaled to sum to ``total`` (largest-remainder rounding, each count within
    one of its exact share and never above it plus one); all of it when ``total`` covers it."""
    whole = int(samples.sum())
    if total >= whole:
        return samples.copy()
    return round_preserving_total(samples * (total / whole), total)


def shuffled(result: AllocationResult, prompt_ids: list[str], seed: int) -> AllocationResult:
    """The same counts given to the prompts in a random order: the control for what GVM's
    choice of prompts is worth, as against how unevenly it spreads the budget. Seeded by the
    run's seed and the batch, so a resumed run shuffles as the uninterrupted one did."""
    batch = zlib.crc32("\n".join(prompt_ids).encode())
    order = np.random.default_rng([seed, batch]).permutation(len(prompt_ids))
    return AllocationResult(samples=result.samples[order], reasons=result.reasons[order],
                            continuous=result.continuous[order])


def accepted_distinct_fraction(groups: list[Group]) -> Optional[float]:
    """Distinct accepted responses within each prompt / accepted responses (None if none).

    Extra samples of a prompt lower the variance of its gradient only when they differ; a
    low-entropy policy repeats itself, and this says how much.
    """
    accepted = [[tuple(s.output_ids) for s, r in zip(g.samples, g.rewards) if r > 0.5]
                for g in groups]
    total = sum(len(a) for a in accepted)
    return sum(len(set(a)) for a in accepted) / total if total else None


def unsound_fraction(groups: list[Group]) -> Optional[float]:
    """Right answers refused for a false worked step / right answers (None if none)."""
    unsound = sum(g.unsound for g in groups)
    right = unsound + sum(g.num_accepted for g in groups)
    return unsound / right if right else None


def merge_groups(first: list[Group], second: list[Group]) -> list[Group]:
    """Stage-1 and stage-2 samples of each prompt as one group (reuse of pre-sampling)."""
    return [Group(a.prompt, a.prompt_ids, a.samples + b.samples, a.rewards + b.rewards,
                  a.unsound + b.unsound) for a, b in zip(first, second)]
