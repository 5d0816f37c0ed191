"""One rank of the multi-process train-step and checkpoint tests.

usage: python tests/_train_worker.py SCENARIO ARGS_JSON
Each scenario runs several checks in one world, asserts on every rank and writes what it
measured to ARGS["out"]/rank{R}.json for the test to compare.
"""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)

MODEL = dict(num_layers=2, hidden_size=32, ffn_hidden_size=48, num_attention_heads=4,
             num_query_groups=2, vocab_size=96, max_position_embeddings=64)
GROUP_SIZES = (3, 2, 2, 1, 3)  # GRPO groups of differing sizes
BUDGET = 40  # tokens per micro-batch: several micro-batches per step


def model_cfg():
    from gvm_mega.config.schema import ModelConfig

    return ModelConfig(**MODEL)


def loss_spec():
    from gvm_mega.training import LossSpec

    return LossSpec(kind="ppo-clip", uses_group_advantages=True, clip_low=0.2, clip_high=0.28,
                    kl_coef=0.1, entropy_coef=0.01, agg="token-mean")


def make_policy(seed: int = 0, *, init_dir=None):
    from gvm_mega.config.schema import OptimConfig
    from gvm_mega.parallel import seed_everything
    from gvm_mega.training import CheckpointManager, Policy

    seed_everything(seed)
    optim = OptimConfig(lr=1e-2, min_lr=1e-3, weight_decay=0.01, clip_grad=1.0,
                        warmup_steps=0, schedule="cosine")
    policy = Policy(model_cfg(), optim=optim, loss=loss_spec(), micro_batch_tokens=BUDGET,
                    total_steps=10, temperature=0.9, perform_initialization=init_dir is None)
    if init_dir is not None:
        loaded = CheckpointManager(Path(init_dir).parent).load(policy, init_dir)
        assert loaded.iteration == 0 and not loaded.optimizer_restored
    return policy


def global_batch(step: int):
    """The whole batch of ``step`` (prompt+response ids, groups, rewards, noise), fixed."""
    from gvm_mega.training import SampleBatch, grpo_advantages

    gen = torch.Generator().manual_seed(1000 + step)
    seqs, plens, groups = [], [], []
    for g, size in enumerate(GROUP_SIZES):
        plen = int(torch.randint(2, 6, (1,), generator=gen))
        prompt = torch.randint(0, MODEL["vocab_size"], (plen,), generator=gen).tolist()
        for _ in range(size):
            rlen = int(torch.randint(1, 12, (1,), generator=gen))
            seqs.append(prompt + torch.randint(0, MODEL["vocab_size"], (rlen,),
                                               generator=gen).tolist())
            plens.append(plen)
            groups.append(g)
    rewards = torch.randint(0, 2, (len(seqs),), generator=gen).float()
    adv = grpo_advantages(rewards, groups).tolist()
    noise = [(0.3 * torch.randn(len(s) - p, generator=gen)).tolist() for s, p in zip(seqs, plens)]
    return SampleBatch(seqs, plens, advantages=adv), noise


def local_indices(n: int) -> list[int]:
    from megatron.core import parallel_state as ps

    dp, r = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    return [i for i in range(n) if i % dp == r]


def gather_samples(values: list, n: int) -> list:
    """Per-sample values of every DP rank, in global order (on every rank)."""
    import torch.distributed as dist

    mine = dict(zip(local_indices(n), values))
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    merged = {}
    for part in everyone:
        merged.update(part)
    return [merged[i] for i in range(n)]


def train(policy, steps, *, inject_nan_on_dp0: bool = False) -> list[dict]:
    """Train on the fixed batches ``steps``; behaviour log-probs from the policy itself."""
    from megatron.core import parallel_state as ps

    reports = []
    for step in steps:
        full, noise = global_batch(step)
        idx = local_indices(len(full))
        batch = full.select(idx)
        old = policy.logprobs(batch)
        old_lp = [[v + 0.5 * e for v, e in zip(lp.tolist(), noise[i])]
                  for lp, i in zip(old.logprobs, idx)]
        ref_lp = [[v - 0.2 * e for v, e in zip(lp.tolist(), noise[i])]
                  for lp, i in zip(old.logprobs, idx)]
        if inject_nan_on_dp0 and ps.get_data_parallel_rank() == 0:
            old_lp[0][0] = float("nan")
        rep = policy.train_step(batch.with_values(old_logprobs=old_lp, ref_logprobs=ref_lp))
        reports.append(rep.as_dict())
    return reports


def params_snapshot(policy) -> list[torch.Tensor]:
    return [p.detach().clone() for p in policy.module.parameters()]


def close(a, b, tol):
    return all(abs(x - y) <= tol for x, y in zip(a, b)) and len(a) == len(b)


def scenario_layouts(args: dict) -> dict:
    """Same initial weights at TP1/TP2/PP2/TP2xPP2 (DP 4/2/2/1): forward log-probs (against a
    plain full-vocabulary computation at TP1) and three train steps; then a NaN is skipped."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from gvm_mega.config.schema import ParallelConfig
    from gvm_mega.models import save_mcore_checkpoint
    from gvm_mega.parallel import init_distributed

    init_dir = Path(args["out"]) / "init"
    report: dict = {"layouts": []}
    for tp, pp in [(1, 1), (2, 1), (1, 2), (2, 2)]:
        layout = init_distributed(ParallelConfig(tp=tp, pp=pp))
        if (tp, pp) == (1, 1):
            save_mcore_checkpoint(make_policy(seed=3).module, init_dir)
        policy = make_policy(init_dir=init_dir)
        full, _ = global_batch(0)
        idx = local_indices(len(full))
        out = policy.logprobs(full.select(idx))
        lp = gather_samples([t.tolist() for t in out.logprobs], len(full))
        ent = gather_samples([t.tolist() for t in out.entropy], len(full))
        entry = {"tp": tp, "pp": pp, "dp": layout.dp, "logprobs": lp, "entropy": ent}
        if (tp, pp) == (1, 1):
            entry["vs_full_vocab"] = _full_vocab_check(policy, full, idx, out)
        if (tp, pp) == (2, 2):
            entry["frozen_gap"] = _frozen_check(init_dir, full, idx, out)
        if (tp, pp) == (1, 1):
            entry["errors"] = _argument_errors(policy, full.select(idx))
        applied = _record_applied_grad_norm(policy)
        entry["steps"] = train(policy, range(3))
        entry["applied_grad_norms"] = applied
        if (tp, pp) == (1, 2):
            entry["nan"] = _nan_check(policy)
        report["layouts"].append(entry)
        dist.barrier()
    report["rank"] = dist.get_rank()
    report["pp_rank"] = ps.get_pipeline_model_parallel_rank()
    return report


def _full_vocab_check(policy, full, idx, out) -> float:
    """Largest gap between the scheduled log-probs and one sample at a time through the
    module with a plain full-vocabulary log_softmax (TP1: the shard is the whole vocab)."""
    worst = 0.0
    with torch.no_grad():
        for k, i in enumerate(idx):
            seq = torch.tensor(full.sequences[i])
            plen = full.prompt_lengths[i]
            tokens = seq[:-1].unsqueeze(0)
            pos = torch.arange(tokens.shape[1]).unsqueeze(0)
            logits = policy.module(tokens, pos, attention_mask=None)[0].float() / 0.9
            logp = torch.log_softmax(logits, dim=-1)
            ref = logp.gather(-1, seq[1:].unsqueeze(-1)).squeeze(-1)[plen - 1:]
            ref_ent = -(logp.exp() * logp).sum(-1)[plen - 1:]
            worst = max(worst, float((ref - out.logprobs[k]).abs().max()),
                        float((ref_ent - out.entropy[k]).abs().max()))
    assert worst <= 1e-5, worst
    return worst


def _record_applied_grad_norm(policy) -> list[float]:
    """Norm of the gradients the optimizer actually applies (after clipping), per update."""
    seen: list[float] = []
    inner = policy.optimizer.step_with_ready_grads

    def step_with_ready_grads():
        seen.append(float(policy.optimizer.get_grad_norm()))
        return inner()

    policy.optimizer.step_with_ready_grads = step_with_ready_grads
    return seen


def _frozen_check(init_dir, full, idx, out) -> float:
    """A frozen reference policy (no DDP, no optimizer) gives the same log-probs."""
    from gvm_mega.models import load_mcore_checkpoint
    from gvm_mega.training import Policy

    ref = Policy(model_cfg(), micro_batch_tokens=17, temperature=0.9, trainable=False,
                 perform_initialization=False)
    load_mcore_checkpoint(ref.module, init_dir)
    assert ref.optimizer is None and not any(p.requires_grad for p in ref.module.parameters())
    got = ref.logprobs(full.select(idx))
    gap = max(float((a - b).abs().max()) for a, b in zip(got.logprobs, out.logprobs))
    assert gap <= 1e-5, gap
    try:
        ref.train_step(full.select(idx))
    except RuntimeError as exc:
        assert "frozen" in str(exc)
    else:
        raise AssertionError("a frozen policy trained")
    return gap


def _argument_errors(policy, batch) -> list[str]:
    """Missing inputs fail before any collective, naming what is missing."""
    errors = []
    zeros = [[0.0] * n for n in batch.response_lengths]
    for bad, needle in ((batch, "old_logprobs"),
                        (batch.with_values(advantages=None, old_logprobs=zeros), "advantages"),
                        (batch.with_values(old_logprobs=zeros), "ref_logprobs")):
        try:
            policy.train_step(bad)
        except ValueError as exc:
            assert needle in str(exc), (needle, str(exc))
            errors.append(str(exc))
        else:
            raise AssertionError(f"train_step accepted a batch without {needle}")
    assert policy.updates == 0
    return errors


def _adam_moments(policy) -> list[torch.Tensor]:
    opts = getattr(policy.optimizer, "chained_optimizers", [policy.optimizer])
    return [state[k] for opt in opts for state in opt.optimizer.state.values()
            for k in ("exp_avg", "exp_avg_sq") if k in state]


def _nan_check(policy) -> dict:
    """A NaN in one rank's behaviour log-probs: every rank skips, nothing changes."""
    before = params_snapshot(policy)
    sched_steps = policy.scheduler.num_steps
    opt_state = [t.clone() for t in _adam_moments(policy)]
    assert opt_state, "no Adam state after three updates"
    rep = train(policy, [5], inject_nan_on_dp0=True)[0]
    assert rep["skipped"] and "non-finite" in rep["reason"], rep
    after = params_snapshot(policy)
    unchanged = all(torch.equal(a, b) for a, b in zip(before, after))
    assert unchanged, "a skipped step changed the weights"
    assert policy.scheduler.num_steps == sched_steps
    opt_after = _adam_moments(policy)
    assert all(torch.equal(a, b) for a, b in zip(opt_state, opt_after))
    assert all(float(p.main_grad.abs().sum()) == 0 for p in policy.model.parameters()
               if getattr(p, "main_grad", None) is not None), "gradients left behind"
    from gvm_mega.training import SampleBatch

    empty = policy.train_step(SampleBatch([], [], advantages=[], old_logprobs=[],
                                          ref_logprobs=[])).as_dict()
    assert empty["skipped"] and empty["reason"] == "no loss tokens in the batch", empty
    assert all(torch.equal(a, b) for a, b in zip(before, params_snapshot(policy)))
    clean = train(policy, [5])[0]
    assert not clean["skipped"] and math.isfinite(clean["loss"]), clean
    return {"skipped": rep, "empty": empty, "clean": clean, "weights_unchanged": unchanged}


def scenario_checkpoint(args: dict) -> dict:
    """TP2xPP2: train, save after steps 2 and 4 (keep 1), continue; resuming at the same
    layout and at TP1 (DP4) equals the continuous run; without optimizer state it does not."""
    import torch.distributed as dist

    from gvm_mega.config.schema import ParallelConfig
    from gvm_mega.parallel import init_distributed
    from gvm_mega.training import CheckpointManager

    root = Path(args["out"]) / "ckpt"
    mgr = CheckpointManager(root, keep_last=1)
    init_distributed(ParallelConfig(tp=2, pp=2))
    policy = make_policy(seed=1)
    assert mgr.load(policy) is None  # nothing saved yet
    steps = {}
    for upto in (2, 4):
        for s, rep in zip(range(upto - 2, upto), train(policy, range(upto - 2, upto))):
            steps[s] = rep
        if upto == 4 and dist.get_rank() == 0:  # a save that died half-way
            (root / ".tmp-iter_0000009").mkdir()
            (root / ".tmp-iter_0000009" / "junk").write_text("x")
        dist.barrier()
        mgr.save(policy, upto, extra_state={"cursor": upto * 10, "stats": {"p0": [1, upto]}})
    draw_after_save = torch.rand(4)
    for s, rep in zip((4, 5), train(policy, [4, 5])):
        steps[s] = rep
    names = sorted(p.name for p in root.iterdir())
    assert names == ["iter_0000004", "latest"], names
    assert mgr.latest() == root / "iter_0000004"

    report: dict = {"continuous": {str(k): v for k, v in steps.items()}, "files": names}
    fresh = make_policy(seed=99)
    loaded = mgr.load(fresh)
    assert loaded.iteration == 4 and loaded.rng_restored and loaded.optimizer_restored
    assert loaded.extra_state == {"cursor": 40, "stats": {"p0": [1, 4]}}, loaded.extra_state
    assert fresh.updates == 4 and fresh.scheduler.num_steps == 4
    assert torch.equal(torch.rand(4), draw_after_save), "RNG state not restored"
    report["same_layout"] = train(fresh, [4, 5])

    init_distributed(ParallelConfig(tp=1, pp=1))
    fresh = make_policy(seed=98)
    loaded = mgr.load(fresh)
    assert loaded.optimizer_restored and not loaded.rng_restored
    assert loaded.saved_layout["tp"] == 2 and loaded.saved_layout["pp"] == 2
    report["tp1"] = train(fresh, [4, 5])
    no_opt = make_policy(seed=97)
    mgr.load(no_opt, load_optimizer=False)
    report["tp1_without_optimizer_state"] = train(no_opt, [4, 5])
    report["rank"] = dist.get_rank()
    return report


def scenario_resume(args: dict) -> dict:
    """A new single process (TP1) continues from ``latest`` of another run."""
    from gvm_mega.config.schema import ParallelConfig
    from gvm_mega.parallel import init_distributed
    from gvm_mega.training import CheckpointManager

    from gvm_mega.config import ConfigError
    from gvm_mega.config.schema import Config, ModelConfig
    from gvm_mega.training import Policy

    init_distributed(ParallelConfig(tp=1, pp=1))
    mgr = CheckpointManager(args["root"], keep_last=1)
    policy = make_policy(seed=5)
    loaded = mgr.load(policy)
    assert loaded.iteration == 4 and loaded.extra_state["cursor"] == 40
    report = {"iteration": loaded.iteration, "steps": train(policy, [4, 5]), "rank": 0}

    # a checkpoint of another model is refused, naming the differing field
    other = Policy(ModelConfig(**{**MODEL, "num_layers": 1}), loss=loss_spec())
    try:
        mgr.load(other)
    except ConfigError as exc:
        assert "model.num_layers" in str(exc), str(exc)
        report["mismatch_error"] = str(exc)
    else:
        raise AssertionError("loaded a checkpoint of a different model")

    # the run config builds the same kind of policy
    cfg = Config()
    cfg.model = model_cfg()
    cfg.algorithm.name = "gvm-grpo"
    cfg.optim.lr = 3e-3
    cfg.parallel.micro_batch_tokens = 64
    from_cfg = Policy.from_config(cfg, total_steps=4)
    assert from_cfg.loss_spec.uses_group_advantages and from_cfg.micro_batch_tokens == 64
    assert abs(from_cfg.lr - 3e-3) < 1e-12
    return report


SCENARIOS = {"layouts": scenario_layouts, "checkpoint": scenario_checkpoint,
             "resume": scenario_resume}


def run_world(scenario: str, world_size: int, args: dict, timeout_s: float = 300.0) -> dict:
    """Run SCENARIO as a local world of ``world_size`` ranks; rank 0's report (fails with the
    logs of every rank when one fails)."""
    from gvm_mega.parallel.launch import launch_local

    root = Path(__file__).resolve().parent.parent
    env = {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": str(root) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    results = launch_local([sys.executable, str(Path(__file__).resolve()), scenario,
                            json.dumps(args)], world_size, env=env, timeout_s=timeout_s)
    if any(r.returncode != 0 for r in results):
        logs = "\n".join(f"--- rank {r.rank} exit {r.returncode} ---\n{r.output[-4000:]}"
                         for r in results)
        raise AssertionError(f"{scenario}: a rank failed\n{logs}")
    return json.loads(Path(args["out"], "rank0.json").read_text())


def main() -> None:
    scenario, args = sys.argv[1], json.loads(sys.argv[2])
    from gvm_mega.parallel import shutdown

    try:
        report = SCENARIOS[scenario](args)
    finally:
        shutdown()
    rank = int(os.environ.get("RANK", "0"))
    Path(args["out"], f"rank{rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main()
