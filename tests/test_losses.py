"""Policy losses against hand-worked examples, and their invariance under micro-batching."""
from __future__ import annotations

import math

import pytest
import torch

from gvm_mega.config.schema import AlgorithmConfig
from gvm_mega.training import (
    LossSpec,
    Normaliser,
    compute_loss,
    grpo_advantages,
    grpo_loss,
    k3_kl,
    megatron_loss_scale,
    ppo_clip_loss,
    raft_loss,
    raft_plus_plus_loss,
    reduce_metrics,
    sample_advantages,
)

LN = math.log


def t(rows):
    return torch.tensor(rows, dtype=torch.float64)


def test_raft_is_masked_nll_token_and_sequence_mean():
    logp = t([[-1.0, -2.0, -3.0], [-0.5, -1.5, -9.0]]).requires_grad_()
    mask = t([[1, 1, 1], [1, 1, 0]])
    # token-mean: (1 + 2 + 3 + 0.5 + 1.5) / 5 tokens = 8 / 5 = 1.6 (the masked -9 is ignored)
    out = raft_loss(logp, mask)
    assert out.loss.item() == pytest.approx(1.6)
    assert out.metrics["loss"].item() == pytest.approx(1.6)
    # gradient: -1/5 on every loss token, 0 on the masked one
    (g,) = torch.autograd.grad(out.loss, logp)
    assert torch.allclose(g, t([[-0.2, -0.2, -0.2], [-0.2, -0.2, 0.0]]))
    # megatron's schedules divide the returned loss in place: the metrics must not follow
    out.loss.detach().div_(4)
    assert out.metrics["loss"].item() == pytest.approx(1.6)
    assert out.metrics["pg_loss"].item() == pytest.approx(1.6)
    # seq-mean: sequence means (1+2+3)/3 = 2 and (0.5+1.5)/2 = 1, averaged: (2 + 1) / 2 = 1.5
    assert raft_loss(logp, mask, agg="seq-mean").loss.item() == pytest.approx(1.5)


def test_raft_plus_plus_clips_high_side_asymmetrically():
    # ratios r = exp(logp - old): 1.5, 0.5 | 1.0, 1.1; last token masked with a wild ratio
    old = t([[0.0, 0.0, 0.0], [-1.0, -1.0, 0.0]])
    logp = (old + t([[LN(1.5), LN(0.5), 0.0], [0.0, LN(1.1), 5.0]]))
    logp[0, 2] = 0.0  # r = 1 but masked
    logp = logp.requires_grad_()
    mask = t([[1, 1, 0], [1, 1, 0]])
    out = raft_plus_plus_loss(logp, old, mask, clip_low=0.2, clip_high=0.28)
    # advantage 1: l = -min(r, clip(r, 0.8, 1.28))
    #   r=1.5 -> -1.28 (clipped) ; r=0.5 -> -0.5 (the min keeps r) ; r=1 -> -1 ; r=1.1 -> -1.1
    #   token-mean = -(1.28 + 0.5 + 1 + 1.1) / 4 = -3.88 / 4 = -0.97
    assert out.loss.item() == pytest.approx(-0.97)
    m = out.metrics
    assert m["clip_fraction"].item() == pytest.approx(0.25)  # only r = 1.5 is clipped
    assert m["ratio_mean"].item() == pytest.approx((1.5 + 0.5 + 1.0 + 1.1) / 4)  # 1.025
    assert m["ratio_max"].item() == pytest.approx(1.5)
    assert m["ratio_min"].item() == pytest.approx(0.5)
    # dl/dlogp = -r / 4 where the clip is inactive, 0 where clipped or masked
    (g,) = torch.autograd.grad(out.loss, logp)
    assert torch.allclose(g, t([[0.0, -0.125, 0.0], [-0.25, -0.275, 0.0]]))


def test_ppo_clip_with_negative_advantages_clips_low_side():
    # tokens: (A=-1, r=0.5), (A=-1, r=1.5), (A=2, r=0.9), one sequence per token
    logp = t([[LN(0.5)], [LN(1.5)], [LN(0.9)]]).requires_grad_()
    old = torch.zeros(3, 1, dtype=torch.float64)
    adv = t([-1.0, -1.0, 2.0])
    mask = torch.ones(3, 1, dtype=torch.float64)
    out = grpo_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.2)
    # l = max(-A r, -A clip(r, 0.8, 1.2)):
    #   max(0.5, 0.8) = 0.8 (clip active) ; max(1.5, 1.2) = 1.5 ; max(-1.8, -1.8) = -1.8
    #   token-mean = (0.8 + 1.5 - 1.8) / 3 = 0.5 / 3
    assert out.loss.item() == pytest.approx(0.5 / 3)
    assert out.metrics["clip_fraction"].item() == pytest.approx(1 / 3)
    # seq-mean over one-token sequences is the same number
    assert grpo_loss(logp, old, adv, mask, agg="seq-mean").loss.item() == pytest.approx(0.5 / 3)


def test_grpo_advantages_with_unequal_groups_and_dr_grpo():
    # groups (ids interleaved on purpose): 7 -> [1, 0, 0], 3 -> [1, 1], 9 -> [0], 5 -> [1, 0, 1, 0]
    rewards = [1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 0.0]
    groups = [7, 3, 7, 3, 9, 7, 5, 5, 5, 5]
    adv = grpo_advantages(rewards, groups, eps=1e-12)
    # group 7: mean 1/3, sample var ((2/3)^2 + 2 (1/3)^2) / 2 = 1/3, std = 0.57735
    #   -> (2/3)/0.57735 = 1.1547 and (-1/3)/0.57735 = -0.57735
    # group 3: equal rewards -> 0 ; group 9: a single sample -> 0
    # group 5: mean 1/2, sample var 4 (1/4) / 3 = 1/3 -> +-0.5/0.57735 = +-0.86603
    s = 1 / math.sqrt(3)
    expect = [(2 / 3) / s, 0, -(1 / 3) / s, 0, 0, -(1 / 3) / s, 0.5 / s, -0.5 / s, 0.5 / s,
              -0.5 / s]
    assert adv.tolist() == pytest.approx(expect, abs=1e-6)
    # Dr.GRPO: r - mean only
    dr = grpo_advantages(rewards, groups, std_norm=False)
    assert dr.tolist() == pytest.approx([2 / 3, 0, -1 / 3, 0, 0, -1 / 3, 0.5, -0.5, 0.5, -0.5])
    with pytest.raises(ValueError, match="group ids"):
        grpo_advantages([1.0, 0.0], [1])


def test_k3_matches_definition_and_is_unbiased_for_kl():
    # k3 = r - log r - 1 with r = pi_ref / pi: logp = log 0.5, ref = log 0.25 -> r = 0.5
    #   0.5 - log 0.5 - 1 = 0.5 + 0.693147 - 1 = 0.193147
    assert k3_kl(t([LN(0.5)]), t([LN(0.25)])).item() == pytest.approx(0.5 + LN(2) - 1)
    assert k3_kl(t([-1.3]), t([-1.3])).item() == 0.0
    # E_{y ~ p}[k3(y)] = sum_y q - 1 + KL(p || q) = KL(p || q), computed exactly
    gen = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(50, dtype=torch.float64, generator=gen), 0)
    q = torch.softmax(torch.randn(50, dtype=torch.float64, generator=gen), 0)
    expected_k3 = (p * k3_kl(p.log(), q.log())).sum()
    assert expected_k3.item() == pytest.approx((p * (p.log() - q.log())).sum().item(), rel=1e-9)


def test_kl_penalty_and_entropy_bonus_enter_the_loss():
    logp = t([[LN(0.5), LN(0.5)]])
    ref = t([[LN(0.25), LN(0.5)]])
    ent = t([[2.0, 1.0]])
    mask = t([[1, 1]])
    out = raft_loss(logp, mask, ref_logprobs=ref, kl_coef=0.1, entropy=ent, entropy_coef=0.01)
    # nll = 0.693147 ; k3 = (0.193147 + 0) / 2 = 0.0965736 ; entropy mean = 1.5
    # loss = 0.693147 + 0.1 * 0.0965736 - 0.01 * 1.5 = 0.687805
    k3 = (0.5 + LN(2) - 1) / 2
    assert out.loss.item() == pytest.approx(LN(2) + 0.1 * k3 - 0.015)
    assert out.metrics["kl"].item() == pytest.approx(k3)
    assert out.metrics["entropy"].item() == pytest.approx(1.5)
    assert out.metrics["pg_loss"].item() == pytest.approx(LN(2))
    with pytest.raises(ValueError, match="ref_logprobs"):
        raft_loss(logp, mask, kl_coef=0.1)
    with pytest.raises(ValueError, match="entropy"):
        raft_loss(logp, mask, entropy_coef=0.1)


def _random_batch(seed: int, rows: int = 7, cols: int = 6):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(rows, cols, generator=g, dtype=torch.float64) * 3
    logp = old + 0.4 * torch.randn(rows, cols, generator=g, dtype=torch.float64)
    ref = old + 0.3 * torch.randn(rows, cols, generator=g, dtype=torch.float64)
    ent = torch.rand(rows, cols, generator=g, dtype=torch.float64) * 2
    mask = (torch.rand(rows, cols, generator=g) > 0.3).to(torch.float64)
    mask[2] = 0.0  # a sequence with no loss token
    adv = torch.randn(rows, generator=g, dtype=torch.float64)
    return logp, old, ref, ent, mask, adv


@pytest.mark.parametrize("name", ["raft", "raft++", "grpo"])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean"])
def test_losses_split_over_micro_batches_and_ranks_sum_to_the_whole(name, agg):
    logp, old, ref, ent, mask, adv = _random_batch(3)
    spec = LossSpec.from_config(AlgorithmConfig(name=name, loss_agg=agg, kl_coef=0.05,
                                                entropy_coef=0.01, clip_low=0.1,
                                                clip_high=0.3))
    extra = dict(old_logprobs=old, ref_logprobs=ref)

    def run(rows, normaliser):
        x = logp[rows].clone().requires_grad_()
        out = compute_loss(spec, logprobs=x, loss_mask=mask[rows], entropy=ent[rows],
                           advantages=adv[rows] if name == "grpo" else None,
                           normaliser=normaliser,
                           **{k: v[rows] for k, v in extra.items()})
        (g,) = torch.autograd.grad(out.loss, x)
        return out, g

    whole, g_whole = run(slice(None), None)
    # two "data-parallel ranks" with two and one micro-batches; the normaliser counts all
    pieces = [slice(0, 3), slice(3, 5), slice(5, 7)]
    norm = Normaliser.from_masks([mask[p] for p in pieces])
    parts = [run(p, norm) for p in pieces]
    total = sum(o.loss for o, _ in parts)
    assert total.item() == pytest.approx(whole.loss.item(), rel=1e-12)
    assert torch.allclose(torch.cat([g for _, g in parts]), g_whole, atol=1e-14)
    merged = reduce_metrics([o.metrics for o, _ in parts])
    for key, value in reduce_metrics([whole.metrics]).items():
        assert merged[key] == pytest.approx(value, rel=1e-12), key
    # a locally normalised piece would not add up: the global count matters
    local = sum(run(p, None)[0].loss for p in pieces)
    assert local.item() != pytest.approx(whole.loss.item())


def test_normaliser_counts_tokens_and_nonempty_sequences():
    mask = t([[1, 1, 0], [0, 0, 0], [1, 0, 0]])
    n = Normaliser.from_masks([mask, mask[:1]])
    assert (n.tokens, n.sequences) == (5.0, 3.0)
    assert n.for_aggregation("token-mean") == 5.0 and n.for_aggregation("seq-mean") == 3.0
    with pytest.raises(ValueError, match="sequences, tokens"):
        Normaliser.from_masks([torch.ones(3)])


def test_spec_from_config_and_training_selection():
    assert LossSpec.from_config(AlgorithmConfig(name="raft")).kind == "sft"
    pp = LossSpec.from_config(AlgorithmConfig(name="gvm-raft++", clip_high=0.28))
    assert (pp.kind, pp.uses_group_advantages, pp.clip_high) == ("ppo-clip", False, 0.28)
    grpo = LossSpec.from_config(AlgorithmConfig(name="gvm-grpo", grpo_std_norm=False))
    assert grpo.uses_group_advantages and not grpo.std_norm

    keep, adv = sample_advantages(pp, [1.0, 0.0, 1.0], [0, 0, 1])
    assert keep.tolist() == [True, False, True] and adv.tolist() == [1.0, 1.0]
    keep, adv = sample_advantages(grpo, [1.0, 0.0, 1.0], [0, 0, 1])
    assert keep.all() and adv.tolist() == pytest.approx([0.5, -0.5, 0.0])

    logp = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="old_logprobs"):
        compute_loss(pp, logprobs=logp, loss_mask=torch.ones(1, 2))
    with pytest.raises(ValueError, match="advantages"):
        compute_loss(grpo, logprobs=logp, loss_mask=torch.ones(1, 2), old_logprobs=logp)
    with pytest.raises(ValueError, match="loss_mask shape"):
        raft_loss(logp, torch.ones(2, 2))
    with pytest.raises(ValueError, match="aggregation"):
        raft_loss(logp, torch.ones(1, 2), agg="sum")
    with pytest.raises(ValueError, match="advantages has 3"):
        ppo_clip_loss(logp, logp, torch.ones(3), torch.ones(1, 2))


def test_megatron_scale_and_empty_metrics():
    assert megatron_loss_scale(4, 2) == 8.0
    with pytest.raises(ValueError):
        megatron_loss_scale(0, 1)
    # a micro-batch with no loss token contributes nothing, and extremes over nothing are nan
    out = ppo_clip_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1), torch.zeros(1, 2),
                        normaliser=Normaliser(tokens=4.0, sequences=2.0))
    assert out.loss.item() == 0.0
    merged = reduce_metrics([out.metrics])
    assert merged["clip_fraction"] == 0.0 and math.isnan(merged["ratio_max"])


def test_prompt_mean_weights_every_prompt_alike():
    """prompt-mean: a prompt's kept samples share one prompt's worth of weight, the mean
    weight stays 1, and the pooled default is unchanged."""
    pp = LossSpec.from_config(AlgorithmConfig(name="gvm-raft++", prompt_weight="prompt-mean"))
    # prompt 0: 3 accepted of 4; prompt 1: 1 of 1; prompt 2: none accepted
    rewards, groups = [1, 1, 0, 1, 1, 0, 0], [0, 0, 0, 0, 1, 2, 2]
    keep, adv = sample_advantages(pp, rewards, groups)
    assert keep.tolist() == [True, True, False, True, True, False, False]
    # 4 kept over 2 prompts: weight 2 per prompt, split among its own kept samples
    assert adv.tolist() == pytest.approx([2 / 3, 2 / 3, 2 / 3, 2.0])
    assert float(adv.mean()) == pytest.approx(1.0)
    assert float(adv[:3].sum()) == pytest.approx(float(adv[3]))

    grpo = LossSpec.from_config(AlgorithmConfig(name="grpo", prompt_weight="prompt-mean"))
    pooled = LossSpec.from_config(AlgorithmConfig(name="grpo"))
    rewards, groups = [1, 0, 0, 0, 1, 0], [0, 0, 0, 0, 1, 1]
    _, weighted = sample_advantages(grpo, rewards, groups)
    _, plain = sample_advantages(pooled, rewards, groups)
    # 6 samples over 2 prompts: group 0 (4 samples) scaled by 3/4, group 1 (2) by 3/2
    assert weighted.tolist() == pytest.approx([a * s for a, s in
                                               zip(plain.tolist(), [0.75] * 4 + [1.5] * 2)])
    assert sample_advantages(pp, [0, 0], [0, 1])[1].numel() == 0  # nothing accepted


def test_per_draw_weighs_a_prompt_by_its_acceptance_rate():
    """per-draw: kept samples weigh (samples / prompts) / samples of their prompt, so a
    prompt's total weight is its acceptance rate times the mean draw, whatever its n_i."""
    pd = LossSpec.from_config(AlgorithmConfig(name="gvm-raft++", prompt_weight="per-draw"))
    # prompt 0: 2 accepted of 8 drawn; prompt 1: 2 of 2; prompt 2: 0 of 2 (12 over 3: mean 4)
    rewards = [1, 1] + [0] * 6 + [1, 1, 0, 0]
    groups = [0] * 8 + [1] * 2 + [2] * 2
    keep, adv = sample_advantages(pd, rewards, groups)
    assert keep.tolist() == [True, True] + [False] * 6 + [True, True, False, False]
    assert adv.tolist() == pytest.approx([0.5, 0.5, 2.0, 2.0])
    # total weight per prompt = 4 x acceptance rate: 4 x 2/8 = 1 and 4 x 2/2 = 4
    assert float(adv[:2].sum()) == pytest.approx(1.0) and float(adv[2:].sum()) == pytest.approx(4.0)
    # equal draws: the same as pooled
    pooled = LossSpec.from_config(AlgorithmConfig(name="gvm-raft++"))
    assert sample_advantages(pd, [1, 0, 1, 1], [0, 0, 1, 1])[1].tolist() == \
        sample_advantages(pooled, [1, 0, 1, 1], [0, 0, 1, 1])[1].tolist()
    assert sample_advantages(pd, [0, 0], [0, 1])[1].numel() == 0  # nothing accepted


def test_prompt_mean_is_refused_for_plain_raft():
    from gvm_mega.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="algorithm.prompt_weight"):
        load_config(None, ["algorithm.name=raft", "algorithm.prompt_weight=prompt-mean"])
    assert load_config(None, ["algorithm.prompt_weight=prompt-mean"]).algorithm.prompt_weight \
        == "prompt-mean"
