"""Prompt readers, malformed-row policy, dedupe, ids, the resumable stream and templates."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from _tokenizer_helpers import llama_like, qwen_like
from gvm_mega.config import apply_overrides
from gvm_mega.config.schema import Config, DataConfig
from gvm_mega.data import (
    DataError,
    HFChatTemplate,
    PlainTemplate,
    PromptStream,
    QwenMathCoTTemplate,
    TemplateError,
    build_template,
    content_id,
    load_prompts,
    read_prompts,
)
from gvm_mega.tokenizer import builtin_tokenizer


def write_jsonl(path: Path, rows: list) -> Path:
    lines = [r if isinstance(r, (str, bytes)) else json.dumps(r) for r in rows]
    path.write_bytes(b"\n".join(line if isinstance(line, bytes) else line.encode() for line in lines) + b"\n")
    return path


GOOD = [{"problem": "What is 1+1?", "answer": "2"},
        {"problem": "What is 2+3?", "answer": 5},
        {"problem": "How far?", "answer": 27.0},
        {"problem": "List them.", "answer": [1, 2]}]


def test_jsonl_fields_ids_and_types(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", GOOD + ["", "   "])  # blank lines are not rows
    ps = read_prompts(path)
    assert [p.problem for p in ps] == [r["problem"] for r in GOOD]
    assert [p.answer for p in ps] == ["2", 5, 27.0, [1, 2]]  # gold types kept as stored
    assert isinstance(ps[2].answer, float)
    assert ps.stats.rows == 4 and ps.stats.kept == 4 and not ps.stats.skipped
    assert ps[0].id == content_id("What is 1+1?") == content_id("  What is\n1+1? ")
    assert read_prompts(path).ids == ps.ids  # stable across reads
    renamed = write_jsonl(tmp_path / "q.jsonl", [
        {"uid": 7, "question": "Q one", "final": "1", "solution": "s", "level": 3},
        {"uid": "x", "question": "Q two", "final": "2"}])
    ps = read_prompts(renamed, prompt_field="question", answer_field="final", id_field="uid")
    assert ps.ids == ["7", "x"]
    assert ps[0].solution == "s" and ps[0].meta == {"level": 3}


def test_dedupe_counts_and_unique_ids(tmp_path):
    rows = GOOD + [{"problem": "What is  1+1?", "answer": "2"}, GOOD[1]]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    ps = read_prompts(path)
    assert len(ps) == 4 and ps.stats.duplicates == 2 and "2 duplicates dropped" in ps.stats.summary()
    kept = read_prompts(path, dedupe=False)
    assert len(kept) == 6 and len(set(kept.ids)) == 6
    clash = write_jsonl(tmp_path / "c.jsonl", [{"id": 1, "problem": "A", "answer": 1},
                                               {"id": 1, "problem": "B", "answer": 2}])
    with pytest.raises(DataError, match=r"c.jsonl:2: id '1' already used at .*c.jsonl:1"):
        read_prompts(clash, id_field="id")


BAD_ROWS = [
    ('{"problem": "ok", "answer": 1}', None),
    ('{"problem": "broken", "answer": ', "broken JSON"),
    ('{"answer": 3}', "missing problem"),
    ('{"problem": "  ", "answer": 3}', "empty problem"),
    ('{"problem": "no answer", "answer": ""}', "empty answer"),
    ('{"problem": "null answer", "answer": null}', "empty answer"),
    ('{"problem": "no answer field"}', "missing answer"),
    ('[1, 2]', "not an object"),
    ('{"problem": 12, "answer": 1}', "bad problem"),
    ('{"problem": "a bool gold", "answer": true}', "bad answer"),
    (b'{"problem": "caf\xe9", "answer": 1}', "non-UTF-8"),
    ('{"problem": "fine too", "answer": "x"}', None),
]


def test_malformed_rows_error_names_file_and_line(tmp_path):
    for lineno, (row, reason) in enumerate(BAD_ROWS, start=1):
        if reason is None:
            continue
        path = write_jsonl(tmp_path / f"bad{lineno}.jsonl", [BAD_ROWS[0][0], row])
        with pytest.raises(DataError) as info:
            read_prompts(path)
        message = str(info.value)
        assert f"bad{lineno}.jsonl:2: " in message, message
        assert "on_bad_row=skip" in message


def test_malformed_rows_skipped_and_counted(tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", [row for row, _ in BAD_ROWS])
    ps = read_prompts(path, on_bad_row="skip")
    assert [p.problem for p in ps] == ["ok", "fine too"]
    expected: dict[str, int] = {}
    for _, reason in BAD_ROWS:
        if reason:
            expected[reason] = expected.get(reason, 0) + 1
    assert ps.stats.skipped == expected
    assert ps.stats.rows == len(BAD_ROWS) and ps.stats.kept == 2
    assert any(":2: broken JSON" in e for e in ps.stats.skipped_examples)
    assert "10 malformed skipped" in ps.stats.summary()


def test_whole_file_problems_always_raise(tmp_path):
    with pytest.raises(DataError, match="no such prompt file"):
        read_prompts(tmp_path / "absent.jsonl")
    (tmp_path / "p.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unknown prompt file type '.csv'"):
        read_prompts(tmp_path / "p.csv")
    all_bad = write_jsonl(tmp_path / "allbad.jsonl", ['{"x": 1}', "nope"])
    with pytest.raises(DataError, match="no usable prompts"):
        read_prompts(all_bad, on_bad_row="skip")
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match="not a readable parquet file"):
        read_prompts(tmp_path / "broken.parquet")


def test_parquet_reader(tmp_path):
    table = pa.table({"question": ["A?", "B?", "", "C?", "A?"],
                      "gold": ["1", "2", "3", None, "1"],
                      "source": ["x", "y", "z", "w", "v"]})
    path = tmp_path / "p.parquet"
    pq.write_table(table, path)
    ps = read_prompts(path, prompt_field="question", answer_field="gold", on_bad_row="skip")
    assert [p.problem for p in ps] == ["A?", "B?"]
    assert ps.stats.skipped == {"empty problem": 1, "empty answer": 1} and ps.stats.duplicates == 1
    with pytest.raises(DataError, match=r"p.parquet:row 3: field 'question' is empty"):
        read_prompts(path, prompt_field="question", answer_field="gold")
    with pytest.raises(DataError, match="no column 'problem' .*columns: question, gold, source"):
        read_prompts(path)
    binary = tmp_path / "b.parquet"
    pq.write_table(pa.table({"problem": [b"ok", b"\xff\xfe"], "answer": [1, 2]}), binary)
    ps = read_prompts(binary, on_bad_row="skip")
    assert [p.problem for p in ps] == ["ok"] and ps.stats.skipped == {"non-UTF-8": 1}


def test_stream_is_deterministic_complete_and_resumable(tmp_path):
    path = write_jsonl(tmp_path / "s.jsonl", [{"problem": f"P{i}", "answer": i} for i in range(10)])
    prompts = read_prompts(path).prompts
    a = PromptStream(prompts, seed=5)
    b = PromptStream(prompts, seed=5)
    first = [p.id for p in a.next_batch(10)]
    assert first == [p.id for p in b.next_batch(10)]
    assert sorted(first) == sorted(p.id for p in prompts)          # each once per epoch
    assert first != [p.id for p in prompts]                          # shuffled
    assert first != [p.id for p in PromptStream(prompts, seed=6).next_batch(10)]
    second = [p.id for p in a.next_batch(10)]
    assert sorted(second) == sorted(first) and second != first       # new order per epoch
    # resume mid-epoch from a JSON-saved cursor
    c = PromptStream(prompts, seed=5)
    c.next_batch(13)
    state = json.loads(json.dumps(c.state_dict()))
    expected = [p.id for p in c.next_batch(12)]
    d = PromptStream(prompts, seed=0)
    d.load_state_dict(state)
    assert [p.id for p in d.next_batch(12)] == expected
    assert d.epoch == 2 and d.position == 5
    with pytest.raises(DataError, match="different prompt set"):
        PromptStream(prompts[:9], seed=5).load_state_dict(state)
    with pytest.raises(DataError, match="empty prompt set"):
        PromptStream([])


def _plain_epochs(n: int, seed: int, epochs: int) -> list[int]:
    """The stream's order without deferral: each epoch's shuffle, concatenated."""
    import random
    out: list[int] = []
    for e in range(epochs):
        order = list(range(n))
        random.Random(f"prompt-stream:{seed}:{e}").shuffle(order)
        out += order
    return out


@pytest.mark.parametrize("n,size", [(10, 4), (10, 7), (1000, 32), (33, 32)])
def test_stream_batches_across_epochs_never_repeat_a_prompt(tmp_path, n, size):
    prompts = read_prompts(write_jsonl(tmp_path / "s.jsonl",
                                       [{"problem": f"P{i}", "answer": i} for i in range(n)])).prompts
    index = {p.id: i for i, p in enumerate(prompts)}
    plain_differs = 0
    for seed in range(20):
        stream = PromptStream(prompts, seed=seed)
        batches = [[index[p.id] for p in stream.next_batch(size)] for _ in range(3 * n // size)]
        flat = [i for b in batches for i in b]
        assert all(len(set(b)) == size for b in batches)
        # every epoch still visits every prompt once
        assert all(sorted(flat[k:k + n]) == list(range(n)) for k in range(0, len(flat) - n + 1, n))
        # where the plain order repeats no prompt within a batch, the stream is the plain order
        plain = _plain_epochs(n, seed, 4)[:len(flat)]
        plain_batches = [plain[k:k + size] for k in range(0, len(plain), size)]
        if all(len(set(b)) == size for b in plain_batches):
            assert flat == plain
        else:
            plain_differs += 1
    assert plain_differs > 0  # the cases above do hit a repeat in the plain order


def test_stream_resumes_after_a_deferral(tmp_path):
    prompts = read_prompts(write_jsonl(tmp_path / "s.jsonl",
                                       [{"problem": f"P{i}", "answer": i} for i in range(10)])).prompts
    for seed in range(20):
        a = PromptStream(prompts, seed=seed)
        a.next_batch(7)
        a.next_batch(7)  # spans epochs 0 and 1: 3 + 4 prompts
        state = json.loads(json.dumps(a.state_dict()))
        b = PromptStream(prompts, seed=0)
        b.load_state_dict(state)
        assert [p.id for p in b.next_batch(20)] == [p.id for p in a.next_batch(20)]
    with pytest.raises(DataError, match="out of range"):
        PromptStream(prompts).load_state_dict({**state, "deferred": [10]})


def test_stream_skips_what_it_is_told_to_within_a_cap(tmp_path):
    prompts = read_prompts(write_jsonl(tmp_path / "s.jsonl",
                                       [{"problem": f"P{i}", "answer": i} for i in range(10)])).prompts
    odd = {p.id for i, p in enumerate(prompts) if i % 2}
    plain = [p.id for p in PromptStream(prompts, seed=3).next_batch(10)]
    stream = PromptStream(prompts, seed=3)
    batch = [p.id for p in stream.next_batch(3, skip=lambda p: p.id in odd, max_skips=100)]
    # the even prompts in stream order, the odd ones before them passed over and counted
    assert batch == [i for i in plain if i not in odd][:3]
    assert stream.last_skipped == sum(i in odd for i in plain[:plain.index(batch[-1])])
    assert stream.next_batch(2) and stream.last_skipped == 0
    # past the cap prompts are taken as they come, so an all-skippable set still yields batches
    capped = PromptStream(prompts, seed=3)
    assert [p.id for p in capped.next_batch(4, skip=lambda p: True, max_skips=2)] == plain[2:6]
    assert capped.last_skipped == 2
    # many skips across epoch boundaries never repeat a prompt within a batch
    for seed in range(20):
        stream = PromptStream(prompts, seed=seed)
        for _ in range(12):
            ids = [p.id for p in stream.next_batch(4, skip=lambda p: p.id in odd, max_skips=16)]
            assert len(set(ids)) == 4 and not set(ids) & odd


def test_builtin_levels_above_worked_max_level_lose_their_worked_solutions(tmp_path):
    """``data.arithmetic_worked_max_level``: the same problems, but the harder levels carry no
    worked solution, so the warm start learns only the easier ones."""
    from gvm_mega.trainer.warm_start import sft_pairs

    base = apply_overrides(Config(), ["data.arithmetic_train_size=80",
                                      "data.arithmetic_max_level=3",
                                      "data.arithmetic_solutions=any-order"]).data
    full = load_prompts("builtin:arithmetic", base)
    cut = load_prompts("builtin:arithmetic", replace(base, arithmetic_worked_max_level=1))
    assert [(p.id, p.problem, p.answer) for p in cut] == [(p.id, p.problem, p.answer)
                                                           for p in full]
    for a, b in zip(full, cut):
        if a.meta["level"] <= 1:
            assert (b.solution, b.other_solutions) == (a.solution, a.other_solutions)
        else:
            assert a.solution and (b.solution, b.other_solutions) == (None, ())
    assert {p.meta["level"] for p in cut} == {0, 1, 2, 3}
    tok, template = builtin_tokenizer(tmp_path / "cache"), PlainTemplate()
    easy = sum(p.meta["level"] <= 1 for p in full)
    assert len(sft_pairs(cut.prompts, template, tok)) == easy < len(full)
    with pytest.raises(DataError, match=r"data.arithmetic_worked_max_level \(0\) is below "
                                        r"data.arithmetic_min_level \(1\)"):
        load_prompts("builtin:arithmetic", replace(base, arithmetic_min_level=1,
                                                   arithmetic_worked_max_level=0))


def test_qwen_math_and_plain_templates():
    text = QwenMathCoTTemplate().render("  What is 1+1? \n")
    assert text == ("<|im_start|>system\nPlease reason step by step, and put your final answer "
                    "within \\boxed{}.<|im_end|>\n<|im_start|>user\nWhat is 1+1? Let's think step "
                    "by step and output the final answer within \\boxed{}.<|im_end|>\n"
                    "<|im_start|>assistant\n")
    assert PlainTemplate().render("Compute 1 + 2.") == "Problem: Compute 1 + 2.\nSolution:\n"
    assert build_template("qwen-math-cot").render("x") == QwenMathCoTTemplate().render("x")
    with pytest.raises(TemplateError, match="unknown prompt template 'chatml'"):
        build_template("chatml")


def test_hf_chat_template_matches_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    for path in (qwen_like(tmp_path / "q"), llama_like(tmp_path / "l")):
        template = build_template("hf-chat", tokenizer_dir=path)
        ref = transformers.AutoTokenizer.from_pretrained(str(path))
        for problem in ("What is 1+1?", "Ünïcödé ∑ and {{ braces }} and a trailing space "):
            expected = ref.apply_chat_template(template.messages(problem), tokenize=False,
                                               add_generation_prompt=True)
            assert template.render(problem) == expected
    with_system = build_template("hf-chat", tokenizer_dir=tmp_path / "q", system="Be brief.")
    assert with_system.render("Hi").startswith("<|im_start|>system\nBe brief.<|im_end|>")
    bad_role = HFChatTemplate("{{ raise_exception('no system role') }}")
    with pytest.raises(TemplateError, match="no system role"):
        bad_role.render("x")
    with pytest.raises(TemplateError, match="does not compile"):
        HFChatTemplate("{% for %}")
    with pytest.raises(TemplateError, match="no chat_template in"):
        build_template("hf-chat", tokenizer_dir=qwen_like(tmp_path / "none", chat_template=None))
    with pytest.raises(TemplateError, match="needs a tokenizer directory"):
        build_template("hf-chat")


def test_load_prompts_builtin_and_length_filter(tmp_path):
    cfg = apply_overrides(Config(), ["data.arithmetic_train_size=60", "data.arithmetic_test_size=20",
                                     "data.on_bad_row=skip"]).data
    train = load_prompts("builtin:arithmetic", cfg)
    test = load_prompts("builtin:arithmetic-test", cfg)
    assert len(train) == 60 and len(test) == 20
    assert not set(p.problem for p in train) & set(p.problem for p in test)
    assert load_prompts("builtin:arithmetic", cfg).ids == train.ids
    any_order = load_prompts("builtin:arithmetic", replace(cfg, arithmetic_solutions="any-order"))
    assert [(p.id, p.problem) for p in any_order] == [(p.id, p.problem) for p in train]
    assert [p.solution for p in any_order] != [p.solution for p in train]
    with pytest.raises(DataError, match="unknown built-in data source 'builtin:algebra'"):
        load_prompts("builtin:algebra", cfg)

    tok = builtin_tokenizer(tmp_path / "cache")
    template = PlainTemplate()
    rows = [{"problem": "Compute 1 + 2.", "answer": 3},
            {"problem": "Compute " + " + ".join(["1"] * 200) + ".", "answer": 200},
            {"problem": "broken"}]
    path = write_jsonl(tmp_path / "len.jsonl", rows)
    limit = len(tok.encode(template.render(rows[0]["problem"])))
    cfg = DataConfig(max_prompt_length=limit, on_bad_row="skip")
    ps = load_prompts(str(path), cfg, tokenizer=tok, template=template)
    assert [p.answer for p in ps] == [3]
    assert ps.stats.too_long == 1 and ps.stats.skipped == {"missing answer": 1}
    assert "1 over max_prompt_length dropped" in ps.stats.summary()
    with pytest.raises(DataError, match="every prompt is longer than max_prompt_length=1"):
        load_prompts(str(path), DataConfig(max_prompt_length=1, on_bad_row="skip"),
                     tokenizer=tok, template=template)
