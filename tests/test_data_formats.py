"""Sources, format detection, normalisation and validation: real files in, canonical rows out, bad rows named."""

import csv
import json
import random
import subprocess
import sys

import pytest
from huggingface_hub import DatasetCard

from conftest import REPO
from pipeline.data import demo_tasks
from pipeline.data.cards import dataset_card, size_category
from pipeline.data.formats import RowProblem, detect_format, normalize
from pipeline.data.mixing import load_mixture
from pipeline.data.sources import SourceError, read_records
from pipeline.data.validation import DataValidationError, load_rows

# (file, input format, canonical format, records read, rows kept)
SHARED = [
    ("pretrain/tinyshakespeare.txt", "text", "text", 7222, 7222),
    ("pretrain/quan_tang_shi_0.json", "poetry", "text", 1000, 1000),
    ("pretrain/lunyu.json", "poetry", "text", 20, 20),
    ("pretrain/shijing.json", "poetry", "text", 305, 305),
    ("sft/alpaca_en_0-3252.json", "alpaca", "messages", 3252, 3248),
    ("sft/alpaca_zh_0-3252.json", "alpaca", "messages", 3247, 3243),
    ("preference/hh_rlhf_harmless_base_test_0-1800.jsonl", "hh", "preference", 1800, 1800),
    ("eval/alpaca_seed_tasks.jsonl", "seed_tasks", "prompt_completion", 175, 175),
]


@pytest.mark.parametrize("name,fmt,canonical,records,kept", SHARED, ids=[s[0] for s in SHARED])
def test_shared_files_load_through_detection(shared_data, name, fmt, canonical, records, kept):
    result = load_rows(shared_data / name)
    assert dict(result.report.formats) == {fmt: records - result.report.num_dropped}
    assert result.canonical_format == canonical
    assert (result.report.records, result.report.kept) == (records, kept)
    assert result.report.records == result.report.kept + result.report.num_dropped  # nothing vanishes uncounted


def test_alpaca_rows_with_empty_outputs_are_named_by_line(shared_data):
    path = shared_data / "sft/alpaca_en_0-3252.json"
    result = load_rows(path)
    assert result.report.dropped == {"output: empty": 4}
    first = result.report.issues[0]
    assert str(first).startswith(f"{path}:1422: output: empty (")
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines[1421].strip() == "{" and '"output": ""' in lines[1424]  # line 1422 opens that very object


def test_alpaca_becomes_a_user_assistant_chat(shared_data):
    rows = load_rows(shared_data / "sft/alpaca_en_0-3252.json").rows
    with_input = next(r for r in rows if "\n\n" in r["messages"][0]["content"])
    assert [m["role"] for m in with_input["messages"]] == ["user", "assistant"]
    raw = json.loads((shared_data / "sft/alpaca_en_0-3252.json").read_text())
    source = next(r for r in raw if r["input"] and r["output"])
    assert rows[raw.index(source) - sum(1 for r in raw[: raw.index(source)] if not r["output"])]["messages"][0][
        "content"] == f"{source['instruction']}\n\n{source['input']}"


def test_hh_pairs_split_into_shared_prompt_and_diverging_answers(shared_data):
    path = shared_data / "preference/hh_rlhf_harmless_base_test_0-1800.jsonl"
    result = load_rows(path)
    raw = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert len(result.rows) == 1800
    for row, original in zip(result.rows, raw):
        assert row["prompt"][-1]["role"] == "user"
        assert row["chosen"][0]["role"] == row["rejected"][0]["role"] == "assistant"
        assert row["chosen"] != row["rejected"]
        # prompt + each answer rebuild the original transcripts exactly (content-wise)
        for key in ("chosen", "rejected"):
            rebuilt = "".join(f"\n\n{'Human' if t['role'] == 'user' else 'Assistant'}: {t['content']}"
                              for t in row["prompt"] + row[key])
            assert " ".join(rebuilt.split()) == " ".join(original[key].split())


def test_poetry_field_mapping_and_title(shared_data):
    rows = load_rows(shared_data / "pretrain/quan_tang_shi_0.json").rows
    assert rows[0]["text"].splitlines()[:2] == ["帝京篇十首 一", "秦川雄帝宅，函谷壯皇居。"]
    mapped = load_rows(shared_data / "pretrain/shijing.json", format="text", fields={"text": "title"}).rows
    assert mapped[0] == {"text": "关雎"}


# --------------------------------------------------------------------------- broken inputs


@pytest.fixture
def broken_jsonl(tmp_path):
    path = tmp_path / "broken.jsonl"
    lines = [
        b'{"prompt": "ok", "completion": "fine"}',
        b'{"prompt": "cut off", "completion": ',  # corrupt JSON
        b'{"prompt": "no completion"}',  # missing field
        b'{"prompt": 7, "completion": "number prompt"}',  # wrong type
        b'{"prompt": "   ", "completion": "empty prompt"}',  # empty text
        b'{"prompt": "caf\xe9", "completion": "latin-1 byte"}',  # not UTF-8
        b'{"prompt": "also ok", "completion": "fine"}',
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def test_every_bad_row_is_reported_with_file_and_line(broken_jsonl):
    result = load_rows(broken_jsonl)
    assert result.report.records == 7 and result.report.kept == 2
    messages = [str(issue) for issue in result.report.issues]
    expected = [(2, "(json): corrupt JSON"), (3, "completion: missing"), (4, "prompt: expected text, got int"),
                (5, "prompt: empty"), (6, "(bytes): not valid UTF-8")]
    assert len(messages) == len(expected)
    for message, (line, text) in zip(messages, expected):
        assert message.startswith(f"{broken_jsonl}:{line}: {text}"), message
        assert message.endswith(")")  # every problem carries its fix
    table = result.report.table()
    assert "dropped: completion: missing" in table and "rows kept" in table


def test_strict_mode_fails_on_the_first_bad_row(broken_jsonl):
    with pytest.raises(DataValidationError, match=rf"^{broken_jsonl}:2: \(json\): corrupt JSON"):
        load_rows(broken_jsonl, strict=True)


def test_hh_row_without_assistant_turn(tmp_path):
    path = tmp_path / "hh.jsonl"
    good = {"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go away"}
    bad = {"chosen": "\n\nHuman: hi there", "rejected": "\n\nHuman: hi\n\nAssistant: go away"}
    path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    result = load_rows(path)
    assert result.report.kept == 1
    assert str(result.report.issues[0]).startswith(f"{path}:2: chosen: has no 'Assistant:' turn")
    assert result.rows[0] == {"prompt": [{"role": "user", "content": "hi"}],
                              "chosen": [{"role": "assistant", "content": "hello"}],
                              "rejected": [{"role": "assistant", "content": "go away"}]}


def test_json_array_elements_carry_their_start_lines(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text('[\n  {"text": "a"},\n\n  {"text":\n    ""},\n  {"text": "c"}\n]\n')
    result = load_rows(path)
    assert [str(o) for o in result.origins] == [f"{path}:2", f"{path}:6"]
    assert str(result.report.issues[0]) .startswith(f"{path}:4: text: empty")


def test_non_utf8_line_inside_a_json_array_drops_only_its_row(tmp_path):
    path = tmp_path / "rows.json"
    path.write_bytes(b'[\n{"text": "good"},\n{"text": "bad \xff"},\n{"text": "also good"}\n]\n')
    result = load_rows(path)
    assert [r["text"] for r in result.rows] == ["good", "also good"]
    assert str(result.report.issues[0]).startswith(f"{path}:3: (bytes): not valid UTF-8")


def test_cli_validate_strict_exits_1_with_path_and_line(broken_jsonl, capsys):
    from pipeline.cli import main as cli

    assert cli(["data", "validate", str(broken_jsonl)]) == 0  # in process; the strict run below is a real process
    out = capsys.readouterr().out
    assert "rows kept" in out and f"{broken_jsonl}:3: completion: missing" in out
    strict = subprocess.run([sys.executable, "-m", "pipeline.cli", "data", "validate", str(broken_jsonl), "--strict"],
                            capture_output=True, text=True, cwd=REPO)
    assert strict.returncode == 1
    assert strict.stderr.startswith(f"{broken_jsonl}:2:")


def test_cli_convert_writes_canonical_jsonl(tmp_path, broken_jsonl, capsys):
    from pipeline.cli import main as cli

    out = tmp_path / "out" / "rows.jsonl"
    assert cli(["data", "convert", str(broken_jsonl), str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows == [{"prompt": "ok", "completion": "fine"}, {"prompt": "also ok", "completion": "fine"}]
    assert "wrote 2 prompt_completion rows" in capsys.readouterr().err


# --------------------------------------------------------------------------- formats and sources


@pytest.mark.parametrize("row,fmt,expected", [
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}, "sharegpt",
     {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}),
    ({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
                   {"role": "assistant", "content": "a"}]}, "messages", None),
    ({"prompt": "q", "chosen": "a", "rejected": "b"}, "preference",
     {"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "a"}],
      "rejected": [{"role": "assistant", "content": "b"}]}),
    ({"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
      "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}]}, "preference",
     {"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "a"}],
      "rejected": [{"role": "assistant", "content": "b"}]}),
    ({"text": "spam spam", "label": "1"}, "classification", {"text": "spam spam", "label": 1}),
    ({"instruction": "Add.", "instances": [{"input": "1 2", "output": "3"}, {"input": "", "output": "0"}]},
     "seed_tasks", None),
])
def test_detection_and_normalisation(row, fmt, expected):
    assert detect_format(row) == fmt
    out = normalize(row, fmt)
    if expected is not None:
        assert out == [expected]
    if fmt == "seed_tasks":
        assert out == [{"prompt": "Add.\n\n1 2", "completion": "3"}, {"prompt": "Add.", "completion": "0"}]
    if fmt == "messages":
        assert out == [row]


@pytest.mark.parametrize("row,fmt,field,problem", [
    ({"messages": [{"role": "user", "content": "q"}]}, "messages", "messages", "does not end with an assistant turn"),
    ({"messages": [{"role": "robot", "content": "q"}]}, "messages", "messages[0].role", "unknown role 'robot'"),
    ({"conversations": [{"from": "gpt", "value": "a"}, {"from": "gpt", "value": "b"}]}, "sharegpt",
     "conversations", "turn 0 is 'assistant' where 'user' belongs"),
    ({"prompt": "q", "chosen": "same", "rejected": "same"}, "preference", "rejected", "identical to chosen"),
    ({"text": "t", "label": 0.5}, "classification", "label", "expected an integer id or a class name"),
])
def test_normaliser_problems_name_the_field(row, fmt, field, problem):
    with pytest.raises(RowProblem) as e:
        normalize(row, fmt)
    assert e.value.field == field and e.value.problem.startswith(problem) and e.value.fix


def test_unrecognised_rows_suggest_format_and_field_map(tmp_path):
    path = tmp_path / "odd.jsonl"
    path.write_text('{"question": "q", "reply": "a"}\n')
    result = load_rows(path)
    assert "format not recognised from keys ['question', 'reply']" in str(result.report.issues[0])
    mapped = load_rows(path, format="prompt_completion", fields={"prompt": "question", "completion": "reply"})
    assert mapped.rows == [{"prompt": "q", "completion": "a"}]


def test_csv_parquet_txt_and_folders(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    with open(folder / "a.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerow(["win money now", "1"])
        writer.writerow(["multi\nline", "0"])
        writer.writerow(["", "0"])
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["p1", "p2"], "label": [0, 1]}), folder / "b.parquet")
    result = load_rows(folder)
    assert [r["label"] for r in result.rows] == [1, 0, 0, 1]
    assert [str(o) for o in result.origins] == [f"{folder}/a.csv:2", f"{folder}/a.csv:3", f"{folder}/b.parquet:row 0",
                                                f"{folder}/b.parquet:row 1"]
    assert str(result.report.issues[0]).startswith(f"{folder}/a.csv:5: text: empty")
    txt = tmp_path / "t.txt"
    txt.write_text("one\ntwo\n\n\nthree\n")
    assert [(str(r.origin), r.row) for r in read_records(txt)] == [(f"{txt}:1", "one\ntwo"), (f"{txt}:5", "three")]
    assert len(list(read_records(txt, text_unit="line"))) == 3


def test_missing_sources_and_offline_hub_ids_fail_clearly(tmp_path):
    with pytest.raises(SourceError, match="no such file or folder"):
        list(read_records(tmp_path / "nope.jsonl"))
    with pytest.raises(SourceError, match="unsupported file type '.xml'"):
        (tmp_path / "x.xml").write_text("<a/>")
        list(read_records(tmp_path / "x.xml"))
    with pytest.raises(SourceError, match="could not load from the Hub.*HF_HUB_OFFLINE"):
        list(read_records("someone/not-cached-dataset"))


# --------------------------------------------------------------------------- mixtures, cards, demo data


def test_mixture_samples_dedups_and_splits(tmp_path):
    a = tmp_path / "a.jsonl"
    rows = [{"prompt": f"question number {i} about topic {i * 7}", "completion": f"answer {i}"} for i in range(40)]
    rows.append(dict(rows[0]))  # a planted exact duplicate
    a.write_text("".join(json.dumps(r) + "\n" for r in rows))
    mixture = load_mixture({"seed": 3, "test_size": 5, "sources": [{"path": str(a), "fraction": 1.0},
                                                                   {"path": "demo:eval?n=20", "rows": 10}]})
    assert mixture.canonical_format == "prompt_completion"
    assert mixture.sampled == {str(a): 41, "demo:eval?n=20": 10}
    assert len(mixture.dedup.duplicate_of) == 1
    assert len(mixture.train) + len(mixture.eval) == 50 and len(mixture.eval) == 5
    again = load_mixture({"seed": 3, "test_size": 5, "sources": [{"path": str(a)}, {"path": "demo:eval?n=20", "rows": 10}]})
    assert again.fingerprint() == mixture.fingerprint()
    with pytest.raises(ValueError, match=r"dataset.sources\[0\]: unknown key\(s\) \['fracton'\]"):
        load_mixture({"sources": [{"path": str(a), "fracton": 0.5}]})
    with pytest.raises(ValueError, match="mixes canonical formats"):
        load_mixture({"sources": [{"path": str(a)}, {"path": "demo:sft?n=5"}]})


def test_dataset_card_numbers_and_metadata(shared_data):
    loaded = load_rows(shared_data / "sft/alpaca_zh_0-3252.json")
    card = dataset_card(loaded, name="Alpaca zh", license="cc-by-nc-4.0", language=["zh"], source="hikariming/x")
    parsed = DatasetCard(str(card))
    assert parsed.data.license == "cc-by-nc-4.0" and parsed.data.size_categories == ["1K<n<10K"]
    assert "| rows | 3243 |" in parsed.text and "output: empty: 4" in parsed.text
    assert size_category(999) == "n<1K" and size_category(1000) == "1K<n<10K"


def test_demo_eval_prompts_never_appear_in_training_sets():
    held_out = {t.prompt for t in demo_tasks.eval_tasks(300, seed=0)}
    train = {r["messages"][0]["content"] for r in demo_tasks.sft_rows(3000, seed=0)}
    train |= {r["prompt"][0]["content"] for r in demo_tasks.preference_rows(1000, seed=0)}
    train |= {r["prompt"][0]["content"] for r in demo_tasks.rl_prompt_rows(1000, seed=0)}
    assert held_out and not held_out & train
    for row in demo_tasks.preference_rows(500, seed=1):
        assert row["chosen"] != row["rejected"]
    assert demo_tasks.sft_rows(50, seed=4) == demo_tasks.sft_rows(50, seed=4)


def test_demo_counting_answers_are_all_also_rejected_answers():
    """An answer seen only as `chosen` is a shortcut for a reward model: counting's "0" once was one (a count of 1
    was never paired with "0"), and PPO then answered "0" to every counting question."""
    rng = random.Random(0)
    chosen, rejected = set(), set()
    for task in [t for t in demo_tasks.training_tasks(4000, seed=0, stream=2) if t.kind == "count"]:
        wrong = demo_tasks.wrong_answer(task, rng)
        assert wrong != task.answer and int(wrong) >= 0
        chosen.add(task.answer)
        rejected.add(wrong)
    assert "0" in chosen and chosen <= rejected, sorted(chosen - rejected)


def test_demo_compare_answers_the_larger_number_and_rejects_the_smaller_one_most_often():
    rng = random.Random(0)
    tasks = [t for t in demo_tasks.training_tasks(2000, seed=0, stream=2) if t.kind == "compare"]
    wrong = [demo_tasks.wrong_answer(t, rng) for t in tasks]
    smaller_picked = 0
    for task, bad in zip(tasks, wrong):
        numbers = [int(n) for n in task.prompt.replace("？", " ").replace("?", " ").replace(",", " ").split()
                   if n.isdigit()]
        assert len(numbers) == 2 and task.answer == str(max(numbers)) and bad != task.answer
        smaller_picked += bad == str(min(numbers))
        assert task.statement.count(task.answer) >= 2  # the statement names both numbers, then the larger one
    assert {t.language for t in tasks} == {"en", "zh"}
    assert 0.65 < smaller_picked / len(tasks) < 0.85, smaller_picked / len(tasks)
