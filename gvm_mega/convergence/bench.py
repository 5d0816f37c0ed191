"""``gvm-mega bench convergence``: GVM against uniform sampling, accuracy per sample spent.

One warm-start run trains the supervised warm start once; its weights start every arm
(``checkpoint.load``, ``train.warmup_steps=0``). Each (algorithm, seed) arm then trains on the
same prompts (same ``run.seed`` for every algorithm) with the same rollout budget per
iteration: the GVM variants draw N' pre-samples per prompt plus ``gvm.budget_per_prompt``
in stage 2, the uniform algorithms draw ``algorithm.uniform_n = N' + budget_per_prompt``
per prompt, so every arm generates the same number of responses each iteration and
``samples_total`` (pre-samples included) grows alike. Arms run in fresh processes, ``--jobs``
at a time, each on ``--threads`` torch threads: a tiny model gains almost nothing from a
second thread, so on 2 cores two 1-thread arms at once finish about 1.5x sooner than one
after another. The thread count is fixed per arm because float sums, and so a long run's
curve, depend on it; ``--jobs`` changes only the wall time.

An override written ``ALGORITHM:section.key=value`` applies to that algorithm's arms only
(after the shared ones): GRPO and RAFT++ want different learning rates, for instance.
"""
from __future__ import annotations

import argparse
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, Optional, get_args, get_type_hints

from gvm_mega.convergence.analysis import BASELINES, MIN_GAIN, Curve, load_curve, summarise
from gvm_mega.convergence.arms import (ArmResult, echo_line, export_weights, run_training,
                                       weights_ready)
from gvm_mega.convergence.code_version import source_digest
from gvm_mega.convergence.report import write_outputs

DESCRIPTION = ("GVM-RAFT++/GVM-GRPO against uniform RAFT++/GRPO from one warm start: held-out "
               "accuracy against samples generated, and the sample-efficiency speedup")

DEFAULT_ALGORITHMS = ("raft++", "gvm-raft++", "grpo", "gvm-grpo")
QUICK_ALGORITHMS = ("raft++", "gvm-raft++")

# Sizes, applied before the user's overrides. The default fits within an hour on 2 CPU cores
# (warm start + 4 algorithms x 3 seeds x 120 iterations, two arms at a time: 21 min on the
# fastest machine that ran it); quick is a smoke test of the whole pipeline.
# The default is the setting where allocation has room to matter (BENCHMARKS.md): several
# correct worked paths per problem, so accepted samples differ, and 4 samples per prompt
# (N' = 2 pre-samples + 2 in stage 2), a budget small enough that where they go counts. RL
# starts from a 2,400-step warm start (eval ~0.89), chosen when each policy step recomputed
# its own old log-probs (no clipping): there it gave GVM the most room. With the corrected
# update both arms learn faster, and twelve seeds read alike from 1,200 and 2,400 steps.
DEFAULT_SIZE = (
    "data.arithmetic_solutions=any-order",
    "train.warmup_steps=2400",
    "train.iterations=120",
    "train.eval_every=6",
    "checkpoint.save_every=10",
    "gvm.presample_n=2",
    "gvm.budget_per_prompt=2",
)
# What makes a GVM arm aim at mean accuracy and use all it knows: every sample weighs the same
# (per-draw), so an allocation changes the update's variance, not its expectation; the paper's
# n_i ~ G_i / sqrt(p_i) (small alpha), which gives prompts the policy fails more often more
# draws (over twelve seeds 1.54x, against 1.33x for n_i ~ G_i sqrt(p_i) at alpha 100, the
# per-draw variance proxy's optimum); the reused pre-samples counted in n_i; p_i and G_i
# estimated from every visit of a prompt, not only this iteration's, with a Beta(3, 1) prior
# near the task's acceptance rate: from two draws, Beta(1, 1) pulls p_i toward 0.5 and spreads
# the estimates more than the truth (`bench ceiling`, BENCHMARKS.md). G_i is the RMS of the
# per-response norms (the scale of their variance); p_i counts every verified draw, stage 2's
# too, and prompts it puts above 0.85 (e.g. 4/4 over one visit) are passed over instead of
# pre-sampled.
GVM_DEFAULTS = ("algorithm.prompt_weight=per-draw", "gvm.alpha=1e-3", "gvm.count_stage1=true",
                "gvm.estimator=posterior", "gvm.prior_a=3", "gvm.prior_b=1",
                "gvm.grad_norm_average=rms", "gvm.skip_solved_above=0.85",
                "gvm.rates_from_stage2=true")
# Per-algorithm settings of the default size, before the user's ALGORITHM: overrides (a key
# the user sets for every arm replaces them). RAFT++ rises sooner at 2e-4 than at the demo's
# 1e-4, and GVM-RAFT++ collapses in some seeds at 4e-4; GRPO collapses at 1e-4 and at 4
# samples per prompt hardly moves below 5e-5 (BENCHMARKS.md).
DEFAULT_PER_ALGORITHM = {
    "raft++": ("optim.lr=2e-4",),
    "gvm-raft++": ("optim.lr=2e-4", *GVM_DEFAULTS),
    "grpo": ("optim.lr=5e-5",),
    "gvm-grpo": ("optim.lr=5e-5", *GVM_DEFAULTS),
}
QUICK_SIZE = (
    "train.iterations=2",
    "train.eval_every=1",
    "train.warmup_steps=2",
    "train.warmup_batch_size=4",
    "train.prompts_per_iteration=2",
    "gvm.presample_n=2",
    "gvm.budget_per_prompt=2",
    "model.num_layers=1",
    "model.hidden_size=32",
    "model.ffn_hidden_size=64",
    "model.num_attention_heads=2",
    "model.num_query_groups=1",
    "rollout.max_new_tokens=8",
    "data.arithmetic_train_size=64",
    "data.arithmetic_test_size=4",
    "reward.workers=1",
)
# Every run of the benchmark: quiet logs, no event files.
COMMON = ("logging.progress_bars=false", "logging.tensorboard=false")
# Keys the benchmark sets per arm; overriding them would break the comparison.
MANAGED_KEYS = ("algorithm.name", "algorithm.uniform_n", "checkpoint.load")


def _default_config() -> Optional[str]:
    path = Path(__file__).resolve().parents[2] / "configs" / "demo_cpu.yaml"
    return str(path) if path.is_file() else None


class _OverridesAnywhere(argparse.ArgumentParser):
    """Takes ``key=value`` overrides before, between and after options: a ``*`` positional
    alone is bound once, so plain parsing rejects overrides that follow an option."""

    _inside = False

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        if self._inside:
            return super().parse_known_args(args, namespace)
        self._inside = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._inside = False


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.__class__ = _OverridesAnywhere
    parser.add_argument("--seeds", type=int, default=None,
                        help="seeds per algorithm (default 3; 1 with --quick)")
    parser.add_argument("--algorithms", default=None,
                        help=f"comma-separated (default {','.join(DEFAULT_ALGORITHMS)}; "
                             f"{','.join(QUICK_ALGORITHMS)} with --quick)")
    parser.add_argument("--out", default=None,
                        help="output directory (default runs/bench-convergence[-quick]); "
                             "re-running with the same --out reuses finished runs")
    parser.add_argument("--quick", action="store_true",
                        help="smoke-test size: 1 seed, 2 algorithms, 2 iterations, tiny model")
    parser.add_argument("--min-gain", type=float, default=MIN_GAIN,
                        help="a baseline must end this much above its start for a speedup to "
                             f"be measured against it (default {MIN_GAIN})")
    parser.add_argument("--jobs", type=int, default=None,
                        help="arms trained at once (default: the CPUs this process may use "
                             "divided by --threads)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of each arm (default 1); results depend on it, "
                             "not on --jobs")
    parser.add_argument("--config", default=None,
                        help="base YAML config (default configs/demo_cpu.yaml)")
    parser.add_argument("--allow-code-change", action="store_true",
                        help="resume an --out whose finished runs were made by other code "
                             "(the package source changed since); they are kept as they are")
    parser.add_argument("overrides", nargs="*", metavar="[ALGORITHM:]section.key=value",
                        help="config overrides for every run, after the benchmark's size; "
                             "with an ALGORITHM: prefix, for that algorithm's arms only")


def _fail(message: str) -> NoReturn:
    from gvm_mega.cli import CLIError

    raise CLIError(message)


def _algorithms(text: Optional[str], quick: bool) -> list[str]:
    from gvm_mega.config.schema import AlgorithmConfig

    known = get_args(get_type_hints(AlgorithmConfig)["name"])
    if text is None:
        return list(QUICK_ALGORITHMS if quick else DEFAULT_ALGORITHMS)
    names = [a.strip() for a in text.split(",") if a.strip()]
    bad = [a for a in names if a not in known]
    if not names or bad:
        _fail(f"--algorithms {text!r}: unknown algorithm(s) {', '.join(bad) or '(none given)'}; "
              f"choose from {', '.join(known)}")
    return list(dict.fromkeys(names))


@dataclass
class Plan:
    """The resolved benchmark: base config, overrides every run shares, arms to train."""

    config: str
    shared: list[str]
    cfg: Any  # the resolved config of the shared settings
    seeds: int
    algorithms: list[str]
    uniform_n: int
    out: Path
    min_gain: float = MIN_GAIN
    per_algorithm: dict[str, list[str]] = field(default_factory=dict)
    jobs: int = 1
    threads: int = 1
    allow_code_change: bool = False


def plan(args: argparse.Namespace) -> Plan:
    """Resolve the options into the runs to make (no training happens here)."""
    from gvm_mega.config import load_config

    config = args.config or _default_config()
    if config is None:
        _fail("no --config given and configs/demo_cpu.yaml is not next to the package")
    if not Path(config).is_file():
        _fail(f"--config {config}: no such file")
    if not 0 <= args.min_gain < 1:
        _fail(f"--min-gain {args.min_gain}: must be in [0, 1) (an accuracy difference)")
    threads = getattr(args, "threads", 1)
    if threads < 1:
        _fail(f"--threads {threads}: must be >= 1")
    jobs = getattr(args, "jobs", None)
    if jobs is None:
        from gvm_mega.parallel.launch_env import usable_cpus

        jobs = max(1, usable_cpus() // threads)
    elif jobs < 1:
        _fail(f"--jobs {jobs}: must be >= 1")
    seeds = args.seeds if args.seeds is not None else (1 if args.quick else 3)
    if seeds < 1:
        _fail(f"--seeds {seeds}: must be >= 1")
    algorithms = _algorithms(args.algorithms, args.quick)
    common, per_algorithm = split_overrides(args.overrides, algorithms)
    if not args.quick:  # the size's per-algorithm defaults, unless the user set that key
        user_keys = {o.split("=", 1)[0].strip() for o in common}
        per_algorithm = {a: [*(d for d in DEFAULT_PER_ALGORITHM.get(a, ())
                               if d.split("=", 1)[0] not in user_keys),
                             *per_algorithm.get(a, [])] for a in algorithms}
        per_algorithm = {a: extra for a, extra in per_algorithm.items() if extra}
    shared = [*COMMON, *(QUICK_SIZE if args.quick else DEFAULT_SIZE), *common]
    cfg = load_config(config, shared)  # ConfigError names the bad key
    for algorithm, extra in per_algorithm.items():
        load_config(config, [*shared, *extra])
    per_prompt = cfg.gvm.presample_n + cfg.gvm.budget_per_prompt
    if per_prompt != int(per_prompt):
        _fail(f"gvm.presample_n + gvm.budget_per_prompt = {per_prompt}: the uniform arms need "
              f"a whole number of samples per prompt to match the GVM arms' rollout budget")
    if cfg.train.iterations < 1:
        _fail("train.iterations must be >= 1 for a convergence benchmark")
    if cfg.train.eval_every < 1:
        _fail("train.eval_every=0 evaluates only at the start and the end: set it to >= 1 "
              "so that the runs have accuracy curves")
    if cfg.train.warmup_steps < 1 and not cfg.model.hf_path:
        _fail("train.warmup_steps is 0 and there is no model.hf_path: the arms would start "
              "from random weights")
    out = Path(args.out or ("runs/bench-convergence" + ("-quick" if args.quick else "")))
    return Plan(config=config, shared=shared, cfg=cfg, seeds=seeds, algorithms=algorithms,
                uniform_n=int(per_prompt), out=out, per_algorithm=per_algorithm,
                min_gain=args.min_gain, jobs=jobs, threads=threads,
                allow_code_change=bool(getattr(args, "allow_code_change", False)))


# Keys whose per-algorithm values would make the arms incomparable (different prompts,
# budgets, eval or warm start).
SHARED_ONLY_PREFIXES = ("data.", "train.", "gvm.presample_n", "gvm.budget_per_prompt",
                        "run.", "model.", "rollout.max_new_tokens", "rollout.temperature")


def split_overrides(overrides: list[str],
                    algorithms: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """Shared overrides and ``ALGORITHM:key=value`` ones by algorithm (validated)."""
    shared: list[str] = []
    per_algorithm: dict[str, list[str]] = {}
    for o in overrides:
        if "=" not in o:
            _fail(f"override {o!r}: expected section.key=value")
        key = o.split("=", 1)[0].strip()
        algorithm = None
        if ":" in key:
            algorithm, key = (part.strip() for part in key.split(":", 1))
            if algorithm not in algorithms:
                _fail(f"override {o!r}: {algorithm!r} is not one of the benchmarked algorithms "
                      f"({', '.join(algorithms)})")
            if key.startswith(SHARED_ONLY_PREFIXES):
                _fail(f"override {o!r}: {key} must be the same for every arm (prompts, budget, "
                      f"model and eval are shared); give it without {algorithm}:")
        if key in MANAGED_KEYS:
            _fail(f"override {o!r}: {key} is set by the benchmark for each run")
        if algorithm is None:
            shared.append(o)
        else:
            per_algorithm.setdefault(algorithm, []).append(f"{key}={o.split('=', 1)[1]}")
    return shared, per_algorithm


def arm_overrides(p: Plan, algorithm: str, seed: int, weights: Path) -> list[str]:
    """The shared overrides plus what makes this arm: algorithm, seed, start weights."""
    return [*p.shared, *p.per_algorithm.get(algorithm, []),
            f"algorithm.name={algorithm}", f"run.seed={seed}",
            f"algorithm.uniform_n={p.uniform_n}", "train.warmup_steps=0",
            f"checkpoint.load={weights.resolve()}"]


SETTINGS_FILE = "settings.json"


def _as_arguments(settings: dict) -> list[str]:
    """The overrides of a settings record as written on the command line."""
    per_algorithm = settings.get("per_algorithm") or {}
    return [*settings.get("overrides", []),
            *(f"{a}:{o}" for a, extra in per_algorithm.items() for o in extra)]


def _resolved_runs(settings: dict, algorithms: list[str]) -> Optional[dict]:
    """The config each run of ``settings`` resolves to (warm start, then one per algorithm),
    or None where its overrides no longer load."""
    from gvm_mega.config import ConfigError, load_config
    from gvm_mega.config.loader import config_to_dict

    shared = list(settings.get("overrides", []))
    per_algorithm = settings.get("per_algorithm") or {}
    try:
        return {name: config_to_dict(load_config(settings["config"], [*shared, *extra]))
                for name, extra in [("warm_start", []),
                                    *((a, list(per_algorithm.get(a, []))) for a in algorithms)]}
    except (ConfigError, KeyError, TypeError, OSError):
        return None


def _same_resolved_runs(old: dict, new: dict, algorithms: list[str]) -> bool:
    """Whether overrides written differently still make the same runs: the same config file
    and threads, and every run's config the same once resolved (``a=1 a=2`` is ``a=2``)."""
    if old.get("config") != new["config"] or old.get("threads") != new["threads"]:
        return False
    resolved = _resolved_runs(new, algorithms)
    return resolved is not None and _resolved_runs(old, algorithms) == resolved


def _lengths_if_only_longer(old: dict, new: dict,
                            algorithms: list[str]) -> Optional[tuple[int, int, list[str]]]:
    """``(old, new, cosine)`` when the two settings make the same runs but for
    ``train.iterations`` (``cosine``: the algorithms whose learning rate decays over the run
    length); None when anything else differs."""
    if old.get("config") != new["config"] or old.get("threads") != new["threads"]:
        return None
    before, after = _resolved_runs(old, algorithms), _resolved_runs(new, algorithms)
    if before is None or after is None:
        return None
    lengths = {(b["train"]["iterations"], a["train"]["iterations"])
               for b, a in zip(before.values(), after.values())}

    def without_length(runs: dict) -> dict:
        return {name: {**cfg, "train": {**cfg["train"], "iterations": None}}
                for name, cfg in runs.items()}

    if len(lengths) != 1 or without_length(before) != without_length(after):
        return None
    (was, now), = lengths
    cosine = [a for a in algorithms if after[a]["optim"]["schedule"] != "constant"]
    return was, now, cosine


def _code_checked(out: Path, old: dict, settings: dict,
                  allowed: bool) -> tuple[dict, dict, bool]:
    """Both records with the same code fields, so the rest compares as settings, and whether
    the code changed. Runs made by other code are refused unless ``allowed``; a record from
    before digests were kept has none and stays without one (what made its runs is unknown)."""
    was, now = old.get("code"), settings["code"]
    code: dict = {"code": now if was is not None else None}
    earlier = list(old.get("earlier_code", []))
    changed = was is not None and was != now
    if changed:
        if not allowed:
            _fail(f"--out {out} holds runs made by other code (package source {was}, now "
                  f"{now}): its finished arms would be reused beside arms of this code; use "
                  f"another --out, or --allow-code-change to resume it as it is")
        echo_line(f"[settings] resuming {out} with other code ({was} -> {now}); its "
                  f"finished runs are kept as they were made")
        earlier.append(was)
    if earlier:
        code["earlier_code"] = earlier
    strip = ("code", "earlier_code")
    return ({**{k: v for k, v in old.items() if k not in strip}, **code},
            {**{k: v for k, v in settings.items() if k not in strip}, **code}, changed)


def check_settings(out: Path, p: Plan) -> None:
    """Record the runs' settings in ``out``; refuse an ``out`` made with other settings
    (its finished runs would be reused and mixed with runs of a different experiment).
    Settings are compared as resolved configs, so overrides spelled differently (another
    order, a value given twice, a default written out) still resume; the file keeps the
    spelling the runs were made with. A larger ``train.iterations`` and nothing else extends
    the runs in place (each arm resumes from its last checkpoint): with a constant learning
    rate that is the run a longer benchmark would have made, so the file takes the new
    settings. The package source's digest is recorded too: runs made by other code are
    refused unless ``--allow-code-change``, which records the new digest beside the old."""
    import json

    settings = {"config": str(Path(p.config).resolve()), "overrides": list(p.shared),
                "threads": p.threads}
    if p.per_algorithm:
        settings["per_algorithm"] = p.per_algorithm
    settings["code"] = source_digest()
    path = out / SETTINGS_FILE
    if path.is_file():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            _fail(f"{path}:{exc.lineno}: invalid JSON ({exc.msg}); remove it or use another --out")
        old, settings, code_changed = _code_checked(out, old, settings, p.allow_code_change)
        if old == settings or _same_resolved_runs(old, settings, p.algorithms):
            if code_changed:  # the recorded spelling stays; the digests are brought up to date
                path.write_text(json.dumps(old, indent=2) + "\n", encoding="utf-8")
            return
        lengths = _lengths_if_only_longer(old, settings, p.algorithms)
        if lengths is not None:
            was, now, cosine = lengths
            if now < was:
                _fail(f"--out {out} holds runs of {was} iterations; train.iterations={now} "
                      f"would read them cut short: use another --out, or "
                      f"train.iterations >= {was}")
            if cosine:
                _fail(f"--out {out}: extending its runs from {was} to {now} iterations would "
                      f"not make the runs a {now}-iteration benchmark makes: the learning rate "
                      f"of {', '.join(cosine)} decays over the run length "
                      f"(optim.schedule=cosine); use another --out")
            echo_line(f"[settings] extending the runs in {out} from {was} to {now} iterations")
            path.write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
            return
        new_args, old_args = _as_arguments(settings), _as_arguments(old)
        added = [o for o in new_args if o not in old_args]
        removed = [o for o in old_args if o not in new_args]
        what = "; ".join(filter(None, [
            f"config {old.get('config')} -> {settings['config']}"
            if old.get("config") != settings["config"] else "",
            f"--threads {old.get('threads')} -> {p.threads}"
            if old.get("threads") != p.threads else "",
            f"new: {' '.join(added)}" if added else "",
            f"no longer: {' '.join(removed)}" if removed else ""])) or "override order"
        _fail(f"--out {out} holds runs made with different settings ({what}); use another "
              f"--out, or the same config and overrides to resume it")
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")


def run_benchmark(p: Plan) -> tuple[dict, list[ArmResult], dict[str, list[Curve]]]:
    """Warm start, then every arm; returns the summary and every process's outcome."""
    out, cfg = p.out, p.cfg
    check_settings(out, p)
    logs = out / "logs"
    base_seed = cfg.run.seed
    weights = out / "warm_start" / "weights"
    arms: list[ArmResult] = []
    warm = run_training("warm_start", p.config, out / "warm_start" / "run",
                        [*p.shared, "train.iterations=0"], 0, logs, threads=p.threads)
    warm.extra["eval_accuracy"] = None
    arms.append(warm)
    if warm.ok:
        if warm.status == "done" or not weights_ready(weights):
            export_weights(warm.run_dir, weights)
        warm.extra["eval_accuracy"] = load_curve(warm.run_dir / "metrics.jsonl").final_accuracy
    todo = [(algorithm, base_seed + k) for algorithm in p.algorithms for k in range(p.seeds)]

    def train_arm(algorithm: str, seed: int) -> ArmResult:
        name = f"{algorithm}-seed{seed}"
        run_dir = out / "runs" / algorithm / f"seed{seed}"
        if not warm.ok:
            arm = ArmResult(name, run_dir, logs / f"{name}.log", "failed",
                            log_tail="not run: the warm start failed")
        else:
            arm = run_training(name, p.config, run_dir,
                               arm_overrides(p, algorithm, seed, weights),
                               cfg.train.iterations, logs, threads=p.threads)
        arm.algorithm, arm.seed = algorithm, seed
        return arm

    with ThreadPoolExecutor(max_workers=max(1, min(p.jobs, len(todo)))) as pool:
        finished = list(pool.map(lambda job: train_arm(*job), todo))
    curves: dict[str, list[Curve]] = {a: [] for a in p.algorithms}
    for arm in finished:  # in (algorithm, seed) order, however the jobs interleaved
        arms.append(arm)
        if arm.ok:
            curve = load_curve(arm.run_dir / "metrics.jsonl")
            arm.extra["curve"] = curve.to_dict()
            curves[arm.algorithm].append(curve)
    return summarise(curves, min_gain=p.min_gain), arms, curves


def main(args: argparse.Namespace) -> int:
    p = plan(args)
    start = time.perf_counter()
    summary, arms, curves = run_benchmark(p)
    cfg = p.cfg
    failures = [a.to_dict() for a in arms if not a.ok]
    meta = {
        "benchmark": "convergence",
        "command": {"config": p.config, "overrides": p.shared,
                    "per_algorithm": p.per_algorithm, "seeds": p.seeds,
                    "algorithms": p.algorithms, "quick": bool(args.quick),
                    "min_gain": p.min_gain, "jobs": p.jobs, "threads": p.threads},
        "budget": {"prompts_per_iteration": cfg.train.prompts_per_iteration,
                   "presample_n": cfg.gvm.presample_n,
                   "budget_per_prompt": cfg.gvm.budget_per_prompt,
                   "uniform_n": p.uniform_n, "iterations": cfg.train.iterations,
                   "eval_every": cfg.train.eval_every,
                   "eval_set": cfg.data.eval_paths},
        "baselines": {v: b for v, b in BASELINES.items() if v in p.algorithms},
        "warm_start": {"run_dir": str(arms[0].run_dir),
                       "weights": str(p.out / "warm_start" / "weights"),
                       "eval_accuracy": arms[0].extra.get("eval_accuracy")},
        "runs": [a.to_dict() for a in arms],
        "failures": failures,
        "code": source_digest(),
        "wall_seconds": round(time.perf_counter() - start, 1),
    }
    paths = write_outputs(p.out, summary, curves, meta)
    print(paths["table_md"].read_text(encoding="utf-8"))
    for name, path in paths.items():
        print(f"wrote {path}")
    if failures:
        print(f"{len(failures)} run(s) failed: "
              f"{', '.join(f['name'] for f in failures)} (log tails in {paths['results']})")
        return 1
    return 0


__all__ = ["DESCRIPTION", "Plan", "add_arguments", "arm_overrides", "main", "plan",
           "run_benchmark"]
