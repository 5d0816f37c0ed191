"""Held-out evaluation: pass@k against brute force, grading and grouping, the eval command."""
from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys

import pytest
import torch

from _rollout_helpers import build_model, free_port, start_server, stop, wait_http
from gvm_mega.data import PlainTemplate, Prompt, load_prompts
from gvm_mega.evaluation import (ProblemResult, default_ks, eval_metrics, evaluate, format_table,
                                 mean_pass_at_k, pass_at_k, prompt_seed, summarise)
from gvm_mega.reward import RewardScorer
from gvm_mega.rollout import EmbeddedEngine, Sample, SamplingParams, load_text_codec

torch.set_num_threads(1)


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


def _eval_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gvm_mega", "eval", *args], env=_env(),
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("tiny-qwen2"))
    build_model(out, arch="qwen2")
    return out


@pytest.fixture(scope="module")
def scorer():
    with RewardScorer(workers=1) as s:
        yield s


# ---- pass@k ------------------------------------------------------------------------------
def test_pass_at_k_equals_brute_force_over_all_k_subsets():
    for n in range(1, 8):
        for c in range(n + 1):
            outcomes = [True] * c + [False] * (n - c)
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(outcomes, k))
                brute = sum(any(s) for s in subsets) / len(subsets)
                assert pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12), (n, c, k)
    assert pass_at_k(200, 3, 100) == pytest.approx(1 - (100 * 99 * 98) / (200 * 199 * 198))
    assert default_ks(8) == [1, 2, 4, 8] and default_ks(6) == [1, 2, 4, 6] and default_ks(1) == [1]
    with pytest.raises(ValueError, match="k=5"):
        pass_at_k(4, 1, 5)
    with pytest.raises(ValueError, match="correct count"):
        pass_at_k(4, 5, 1)


# ---- evaluate() with a scripted engine ---------------------------------------------------
class ScriptedEngine:
    """Answers prompt i's samples with the gold answer for the first CORRECT[i] of them."""

    def __init__(self, prompts: list[Prompt], correct: dict[str, int], tokenizer):
        self.by_ids = {tuple(tokenizer.encode_prompt(PlainTemplate().render(p.problem))): p
                       for p in prompts}
        self.correct = correct
        self.requests = []

    def generate(self, requests):
        out = []
        for req in requests:
            self.requests.append(req)
            p = self.by_ids[req.prompt_ids]
            texts = [f"so \\boxed{{{p.answer}}}" if j < self.correct[p.id] else "\\boxed{-1}"
                     for j in range(req.n)]
            out.append([Sample(output_ids=[5] * (j + 1), logprobs=[0.0] * (j + 1),
                               finish_reason="stop", weight_version="v", text=t)
                        for j, t in enumerate(texts)])
        return out


def test_evaluate_grades_groups_and_seeds_per_prompt(model_dir, scorer):
    tokenizer = load_text_codec(model_dir)
    prompts = [Prompt(id=f"q{i}", problem=f"What is {i} + {i}?", answer=str(2 * i),
                      meta={"level": 1 + i % 2, "subject": "Algebra" if i < 3 else "Geometry"})
               for i in range(5)]
    correct = {"q0": 0, "q1": 4, "q2": 1, "q3": 2, "q4": 0}
    engine = ScriptedEngine(prompts, correct, tokenizer)
    sampling = SamplingParams(max_new_tokens=8, temperature=1.0)
    result = evaluate(engine, tokenizer, prompts, PlainTemplate(), samples=4, sampling=sampling,
                      scorer=scorer, name="scripted", seed=11, batch_prompts=2)
    assert [p.correct for p in result.problems] == [0, 4, 1, 2, 0]
    assert result.accuracy == pytest.approx((0 + 1 + 0.25 + 0.5 + 0) / 5)
    counts = [(4, c) for c in correct.values()]
    for k in (1, 2, 4):
        assert result.pass_at_k[k] == pytest.approx(mean_pass_at_k(counts, k))
    assert result.pass_at_k[4] == pytest.approx(3 / 5)
    level1 = result.groups["level"]["1"]  # q0, q2, q4
    assert level1.problems == 3 and level1.mean_at_k == pytest.approx(0.25 / 3)
    assert result.groups["subject"]["Geometry"].pass_at_k[4] == pytest.approx(0.5)
    assert result.tokens_generated == 5 * (1 + 2 + 3 + 4)
    # Seeds depend on the prompt id only: not on batching or order.
    seeds = {engine.by_ids[r.prompt_ids].id: r.sampling.sampling_seed for r in engine.requests}
    assert seeds == {p.id: prompt_seed(11, p.id) for p in prompts}
    assert len(set(seeds.values())) == 5
    table = format_table([result])
    assert "pass@4" in table and "subject=Geometry" in table and "0.6000" in table
    data = result.to_dict()
    assert data["pass_at_k"]["4"] == pytest.approx(0.6) and len(data["per_problem"]) == 5
    json.dumps(data, allow_nan=False)
    assert eval_metrics([result]) == {"eval_accuracy": pytest.approx(0.35),
                                      "eval_pass_at_4": pytest.approx(0.6)}
    other = summarise("builtin:arithmetic-test",
                      [ProblemResult("x", 4, 4, 1), ProblemResult("y", 4, 0, 1)], 4)
    both = eval_metrics([result, other])  # weighted by problems: (5 * 0.35 + 2 * 0.5) / 7
    assert both["eval_accuracy"] == pytest.approx((5 * 0.35 + 2 * 0.5) / 7)
    assert both["eval_arithmetic_test_accuracy"] == 0.5
    assert both["eval_scripted_pass_at_4"] == pytest.approx(0.6)
    with pytest.raises(ValueError, match="no prompts"):
        evaluate(engine, tokenizer, [], PlainTemplate(), samples=1, sampling=sampling,
                 scorer=scorer)


# ---- evaluate() with the embedded engine -------------------------------------------------
def test_evaluate_with_embedded_engine_is_reproducible_and_order_free(model_dir, scorer):
    tokenizer = load_text_codec(model_dir)
    prompts = load_prompts("builtin:arithmetic-test").prompts[:4]
    engine = EmbeddedEngine.from_pretrained(model_dir, tokenizer=tokenizer, seed=3)
    seen: list[str] = []

    class Recording:
        def score(self, texts, golds, timeout):
            seen.extend(texts)
            return scorer.score(texts, golds, timeout=timeout)

    sampling = SamplingParams(max_new_tokens=6, temperature=1.0,
                              stop_token_ids=tuple(tokenizer.eos_token_ids))
    kwargs = dict(samples=3, sampling=sampling, scorer=Recording(), seed=5)
    a = evaluate(engine, tokenizer, prompts, PlainTemplate(), batch_prompts=4, **kwargs)
    b = evaluate(engine, tokenizer, prompts[::-1], PlainTemplate(), batch_prompts=1, **kwargs)
    assert len(seen) == 2 * 4 * 3
    assert a.tokens_generated > 0 and all(p.samples == 3 for p in a.problems)
    by_id = {p.id: (p.tokens, p.correct) for p in b.problems}
    assert {p.id: (p.tokens, p.correct) for p in a.problems} == by_id
    assert seen[:12] != seen[12:] and sorted(seen[:12]) == sorted(seen[12:])
    assert set(a.groups) == {"level"}  # the arithmetic task records each problem's level


# ---- the command -------------------------------------------------------------------------
def test_eval_command_embedded_and_server_agree(model_dir, tmp_path):
    data = tmp_path / "math.jsonl"
    rows = [{"problem": "What is 1+1?", "answer": "2", "level": 1, "subject": "Algebra"},
            {"problem": "What is 2+3?", "answer": "5", "level": 2, "subject": "Algebra"},
            {"problem": "Compute 7-4.", "answer": 3, "level": 1, "subject": "Prealgebra"}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = ["--model", model_dir, "--data", str(data), "--data", "builtin:arithmetic-test",
              "--limit", "2", "--samples", "2", "--max-new-tokens", "6", "--temperature", "1.0",
              "--seed", "9", "--reward-workers", "1", "--threads", "1"]
    proc, url = start_server(model_dir)
    try:
        out = tmp_path / "embedded.json"
        done = _eval_cli(*common, "--out", str(out))
        assert done.returncode == 0, done.stderr
        assert "pass@2" in done.stdout and "subject=Algebra" in done.stdout
        report = json.loads(out.read_text())
        assert set(report["datasets"]) == {"math.jsonl", "builtin:arithmetic-test"}
        math = report["datasets"]["math.jsonl"]
        assert math["problems"] == 2 and math["samples"] == 2  # --limit 2
        assert set(math["groups"]) == {"level", "subject"}
        assert all(p["samples"] == 2 and p["tokens"] > 0 for p in math["per_problem"])
        wait_http(url + "/health", proc=proc)
        served = _eval_cli(*common, "--url", url, "--out", "-")
        assert served.returncode == 0, served.stderr
        remote = json.loads(served.stdout)
        for name, result in report["datasets"].items():  # same seeds -> same samples
            assert remote["datasets"][name]["per_problem"] == result["per_problem"]
            assert remote["datasets"][name]["pass_at_k"] == result["pass_at_k"]
    finally:
        stop(proc)


def test_eval_command_errors_are_clear(model_dir, tmp_path, capsys):
    from gvm_mega.cli import main

    def fails(*args: str) -> str:
        assert main(["eval", *args]) == 2
        return capsys.readouterr().err

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": "1+1?", "answer": "2"}\n{"problem": "broken"\n')
    err = fails("--model", model_dir, "--data", str(bad))
    assert f"{bad}:2" in err and "JSON" in err
    err = fails("--model", model_dir, "--data", str(tmp_path / "missing.jsonl"))
    assert "missing.jsonl: no such prompt file" in err
    err = fails("--model", str(tmp_path), "--data", "builtin:arithmetic-test")
    assert "no config.json" in err
    assert "--samples must be >= 1" in fails("--model", model_dir, "--data", "builtin:arithmetic-test",
                                             "--samples", "0")
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    err = fails("--model", model_dir, "--data", "builtin:arithmetic-test", "--limit", "1",
                "--url", url)
    assert "generation failed" in err and url in err
    assert "unknown prompt template" in fails("--model", model_dir, "--data",
                                              "builtin:arithmetic-test", "--template", "nope")
