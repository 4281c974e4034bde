"""Readers for user data: every format in every container, detection, and clear errors."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import pytest

from rlhfkit.data.formats import (
    Format,
    ReadReport,
    detect_format,
    parse_row,
    read_comparisons,
    read_demonstrations,
    read_prompts,
    read_rankings,
    read_records,
    read_rows,
)
from rlhfkit.data.records import Comparison, Demonstration, Message, Prompt, Ranking, user
from rlhfkit.errors import ConfigError, DataError


def msg(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def hh(*turns: str) -> str:
    """An hh-rlhf transcript from alternating Human/Assistant turn texts."""
    return "".join(
        f"\n\n{'Human' if i % 2 == 0 else 'Assistant'}: {text}" for i, text in enumerate(turns)
    )


# ---------------------------------------------------------------------------------------------
# Writers for every container
# ---------------------------------------------------------------------------------------------


def _encode(name: str, rows: list[dict]) -> bytes:
    if name.endswith(".gz"):
        return gzip.compress(_encode(name[:-3], rows))
    if name.endswith(".jsonl"):
        return "".join(json.dumps(r) + "\n" for r in rows).encode()
    if name.endswith(".json"):
        return json.dumps(rows).encode()
    if name.endswith(".parquet"):
        import io

        import pyarrow as pa
        import pyarrow.parquet as pq

        buffer = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows), buffer)
        return buffer.getvalue()
    raise AssertionError(name)


def write(tmp_path: Path, name: str, rows: list[dict]) -> Path:
    path = tmp_path / name
    if name.endswith("_saved"):
        import datasets

        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    else:
        path.write_bytes(_encode(name, rows))
    return path


def write_text(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ---------------------------------------------------------------------------------------------
# Each format parses to the right records in each container
# ---------------------------------------------------------------------------------------------

SAMPLES: dict[str, tuple[Format, list[dict], list]] = {
    "hh": (
        Format.HH,
        [
            {"chosen": hh("Hi", "Hello!"), "rejected": hh("Hi", "Go away.")},
            {
                "chosen": hh("Name a fruit", "Apple", "Another?", " Pear "),
                "rejected": hh("Name a fruit", "Apple", "Another?", "Carrot"),
            },
        ],
        [
            Comparison(user("Hi"), "Hello!", "Go away."),
            Comparison(
                (Message("user", "Name a fruit"), Message("assistant", "Apple"), Message("user", "Another?")),
                "Pear",
                "Carrot",
            ),
        ],
    ),
    "preference-strings": (
        Format.PREFERENCE,
        [
            {"prompt": "2+2?", "chosen": "4", "rejected": "5", "margin": 2.0},
            {"prompt": "3+3?", "chosen": "6", "rejected": "7", "margin": None},
        ],
        [Comparison(user("2+2?"), "4", "5", margin=2.0), Comparison(user("3+3?"), "6", "7")],
    ),
    "preference-conversational": (
        Format.PREFERENCE,
        [
            {
                "prompt": [msg("system", "Be brief."), msg("user", "2+2?")],
                "chosen": [msg("assistant", "4")],
                "rejected": [msg("assistant", "5")],
            }
        ],
        [Comparison((Message("system", "Be brief."), Message("user", "2+2?")), "4", "5")],
    ),
    "preference-implicit-prompt": (
        Format.PREFERENCE,
        [
            {
                "chosen": [msg("user", "2+2?"), msg("assistant", "4")],
                "rejected": [msg("user", "2+2?"), msg("assistant", "5")],
            }
        ],
        [Comparison(user("2+2?"), "4", "5")],
    ),
    "demonstration-completion": (
        Format.DEMONSTRATION,
        [{"prompt": "Say hi", "completion": "hi"}, {"prompt": "Say bye", "completion": "bye"}],
        [Demonstration(user("Say hi"), "hi"), Demonstration(user("Say bye"), "bye")],
    ),
    "demonstration-conversational": (
        Format.DEMONSTRATION,
        [{"prompt": [msg("user", "Say hi")], "completion": [msg("assistant", "hi")]}],
        [Demonstration(user("Say hi"), "hi")],
    ),
    "demonstration-messages": (
        Format.DEMONSTRATION,
        [{"messages": [msg("user", "a"), msg("assistant", "b"), msg("user", "c"), msg("assistant", "d")]}],
        [
            Demonstration(
                (Message("user", "a"), Message("assistant", "b"), Message("user", "c")), "d"
            )
        ],
    ),
    "ranking": (
        Format.RANKING,
        [{"prompt": "Pick", "completions": ["x", "y", "z"], "ranking": [1, 2, 1]}],  # gaps: 0 and 1 are free
        [Ranking(user("Pick"), ("x", "y", "z"), (0, 1, 0))],
    ),
    "prompt": (
        Format.PROMPT,
        [
            {"prompt": "Add 2 and 2", "meta": {"family": "math", "answer": "4"}},
            {"prompt": "Add 3 and 3", "meta": {"family": "math", "answer": "6"}},
        ],
        [Prompt(user("Add 2 and 2")), Prompt(user("Add 3 and 3"))],
    ),
}

CONTAINERS = [
    "data.jsonl", "data.json", "data.parquet",
    "data.jsonl.gz", "data.json.gz", "data.parquet.gz", "data_saved",
]


@pytest.mark.parametrize("container", CONTAINERS)
@pytest.mark.parametrize("sample", sorted(SAMPLES))
def test_each_format_in_each_container(tmp_path, sample, container):
    fmt, rows, expected = SAMPLES[sample]
    records, report = read_records(write(tmp_path, container, rows))
    assert records == expected
    assert report.format is fmt and report.records == len(expected)
    assert [r.meta for r in records] == [r.get("meta", {}) for r in rows]


def test_ranking_completions_may_be_single_assistant_messages(tmp_path):
    row = {"prompt": "Pick", "completions": [[msg("assistant", "x")], [msg("assistant", "y")]], "ranking": [1, 0]}
    (record,), _ = read_records(write(tmp_path, "r.jsonl", [row]))
    assert record == Ranking(user("Pick"), ("x", "y"), (1, 0))


def test_json_object_wrapping_one_list(tmp_path):
    path = tmp_path / "wrapped.json"
    path.write_text(json.dumps({"version": 2, "data": SAMPLES["prompt"][1]}))
    records, _ = read_records(path)
    assert records == SAMPLES["prompt"][2]


def test_dataset_dict_uses_split(tmp_path):
    import datasets

    path = tmp_path / "dd"
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list([{"prompt": "train one"}]),
            "test": datasets.Dataset.from_list([{"prompt": "test one"}]),
        }
    ).save_to_disk(str(path))
    assert read_records(path, split="test")[0] == [Prompt(user("test one"))]
    with pytest.raises(DataError, match=r"no split 'dev'; this dataset has \['test', 'train'\]"):
        read_records(path, split="dev")


def test_directory_of_files_read_in_sorted_order_ignoring_other_files(tmp_path):
    write(tmp_path, "b.jsonl", [{"prompt": "second"}])
    write(tmp_path, "a.json", [{"prompt": "first"}])
    write_text(tmp_path, "README.md", "not data")
    records, report = read_records(tmp_path)
    assert records == [Prompt(user("first")), Prompt(user("second"))]
    assert report.path == str(tmp_path)


def test_read_rows_numbers_lines_counting_blank_ones(tmp_path):
    path = write_text(tmp_path, "d.jsonl", '{"prompt": "a"}\n\n   \n{"prompt": "b"}\n')
    assert list(read_rows(path)) == [(1, {"prompt": "a"}), (4, {"prompt": "b"})]


def test_read_rows_raises_on_a_bad_line(tmp_path):
    path = write_text(tmp_path, "d.jsonl", '{"prompt": "a"}\n{oops\n')
    with pytest.raises(DataError, match=r"d\.jsonl, line 2: invalid JSON"):
        list(read_rows(path))


# ---------------------------------------------------------------------------------------------
# Detection and forcing
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sample", sorted(SAMPLES))
def test_detect_format(sample):
    fmt, rows, _ = SAMPLES[sample]
    assert detect_format(rows[0], "x.jsonl", 1) is fmt


def test_plain_chosen_rejected_with_hh_markers_is_hh_and_with_prompt_is_preference():
    transcript = {"chosen": hh("Hi", "A"), "rejected": hh("Hi", "B")}
    assert detect_format(transcript, "x", 1) is Format.HH
    assert detect_format({"prompt": "Hi", **transcript}, "x", 1) is Format.PREFERENCE


def test_forcing_prompt_format_reads_the_prompts_of_a_preference_file(tmp_path):
    path = write(tmp_path, "p.jsonl", SAMPLES["preference-strings"][1])
    records, report = read_records(path, format="prompt")
    assert records == [Prompt(user("2+2?")), Prompt(user("3+3?"))]
    assert report.format is Format.PROMPT


@pytest.mark.parametrize(
    "sample, forced, field, looks_like",
    [
        ("preference-strings", "ranking", "completions", "preference"),
        ("hh", "preference", "prompt", "hh"),
        ("prompt", "demonstration", "completion", "prompt"),
    ],
)
def test_forced_format_mismatch_says_what_the_file_looks_like(tmp_path, sample, forced, field, looks_like):
    path = write(tmp_path, "f.jsonl", SAMPLES[sample][1])
    with pytest.raises(DataError) as info:
        read_records(path, format=forced)
    assert str(info.value).startswith(f"{path}, line 1: field '{field}': missing")
    assert f"(this looks like {looks_like} data)" in str(info.value)


def test_unknown_format_argument():
    with pytest.raises(ConfigError, match="unknown data format 'csv'; expected one of auto, hh"):
        read_records("whatever.jsonl", format="csv")


def test_parse_row_auto_detects_and_accepts_format_strings():
    row = {"prompt": "p", "completion": "c"}
    assert parse_row(row, "auto", "x", 1) == parse_row(row, "demonstration", "x", 1)
    assert parse_row(row, Format.AUTO, "x", 1) == Demonstration(user("p"), "c")


# ---------------------------------------------------------------------------------------------
# Malformed records: each error names the file, the line and the field
# ---------------------------------------------------------------------------------------------

GOOD = {
    "hh": {"chosen": hh("Hi", "A"), "rejected": hh("Hi", "B")},
    "pref": {"prompt": "p", "chosen": "a", "rejected": "b"},
    "demo": {"prompt": "p", "completion": "c"},
    "rank": {"prompt": "p", "completions": ["a", "b"], "ranking": [0, 1]},
    "prompt": {"prompt": "p"},
}

# id -> (valid first row or None, bad row, field named, fragment of the problem)
MALFORMED = {
    "hh-no-assistant-marker": ("hh", {"chosen": hh("Hi"), "rejected": hh("Hi", "B")}, "chosen", "no '\\n\\nAssistant:' turn found"),
    "hh-empty-final-turn": ("hh", {"chosen": hh("Hi", "A"), "rejected": hh("Hi", "  ")}, "rejected", "final Assistant turn is empty"),
    "hh-ends-with-human": ("hh", {"chosen": hh("Hi", "A"), "rejected": hh("Hi", "B", "More?")}, "rejected", "ends with a Human turn"),
    "hh-text-before-first-turn": ("hh", {"chosen": "oops" + hh("Hi", "A"), "rejected": hh("Hi", "B")}, "chosen", "start with '\\n\\nHuman:'"),
    "hh-chosen-not-string": ("hh", {"chosen": 5, "rejected": hh("Hi", "B")}, "chosen", "expected a string, got int"),
    "hh-two-assistant-turns-before-reply": ("hh", {"chosen": hh("Hi", "A") + "\n\nAssistant: C", "rejected": hh("Hi", "B")}, "chosen", "end with a user message, got assistant"),
    "pref-prompt-wrong-type": ("pref", {"prompt": 42, "chosen": "a", "rejected": "b"}, "prompt", "expected a string or a list of {role, content} messages, got int"),
    "pref-missing-rejected": ("pref", {"prompt": "p", "chosen": "a"}, "rejected", "missing; preference records need"),
    "pref-margin-not-number": ("pref", {**GOOD["pref"], "margin": "high"}, "margin", "expected a finite number, got 'high'"),
    "pref-prompt-ends-with-assistant": ("pref", {"prompt": [msg("user", "p"), msg("assistant", "x")], "chosen": "a", "rejected": "b"}, "prompt", "end with a user message, got assistant"),
    "pref-unknown-role": ("pref", {"prompt": [msg("bot", "p")], "chosen": "a", "rejected": "b"}, "prompt[0].role", "expected one of system, user, assistant, got 'bot'"),
    "pref-content-null": ("pref", {"prompt": [{"role": "user", "content": None}], "chosen": "a", "rejected": "b"}, "prompt[0].content", "expected a string, got null"),
    "pref-message-not-object": ("pref", {"prompt": ["p"], "chosen": "a", "rejected": "b"}, "prompt[0]", "expected a {role, content} object, got str"),
    "pref-chosen-last-not-assistant": ("pref", {"prompt": "p", "chosen": [msg("user", "a")], "rejected": "b"}, "chosen", "last message to be from the assistant, got user"),
    "pref-implicit-prompts-differ": (None, {"chosen": [msg("user", "p"), msg("assistant", "a")], "rejected": [msg("user", "q"), msg("assistant", "b")]}, "rejected", "share every message but the last"),
    "pref-strings-without-prompt": (None, {"chosen": "a", "rejected": "b"}, "prompt", "missing; plain-string 'chosen'/'rejected' need a 'prompt'"),
    "demo-messages-last-from-user": ("demo", {"messages": [msg("user", "p")]}, "messages", "last message to be from the assistant, got user"),
    "demo-messages-without-user-turn": ("demo", {"messages": [msg("assistant", "a")]}, "messages", "at least one user message"),
    "demo-empty-assistant-reply": ("demo", {"messages": [msg("user", "p"), msg("assistant", " ")]}, "messages[1].content", "the assistant reply is empty"),
    "demo-missing-completion": ("demo", {"prompt": "p"}, "completion", "missing; demonstration records need {prompt, completion} or {messages}"),
    "demo-empty-prompt": ("demo", {"prompt": "", "completion": "c"}, "prompt", "expected a non-empty prompt"),
    "demo-messages-not-a-list": ("demo", {"messages": "hello"}, "messages", "expected a list of {role, content} messages, got str"),
    "rank-length-mismatch": ("rank", {"prompt": "p", "completions": ["a", "b", "c"], "ranking": [0, 1]}, "ranking", "expected a list of 3 ranks (one per completion), got a list of 2"),
    "rank-negative-rank": ("rank", {"prompt": "p", "completions": ["a", "b"], "ranking": [0, -1]}, "ranking[1]", "an integer from 0 (best) to 1, got -1"),
    "rank-beyond-completions": ("rank", {"prompt": "p", "completions": ["a", "b", "c"], "ranking": [0, 5, 1]}, "ranking[1]", "the rank of completion 1, an integer from 0 (best) to 2, got 5"),
    "pref-lone-surrogate": ("pref", {"prompt": "p \ud800 q", "chosen": "a", "rejected": "b"}, "prompt", "not valid Unicode text: a lone surrogate '\\ud800' at character 2"),
    "rank-single-completion": ("rank", {"prompt": "p", "completions": ["a"], "ranking": [0]}, "completions", "at least 2 completions, got a list of 1"),
    "rank-missing-ranking": (None, {"prompt": "p", "completions": ["a", "b"]}, "ranking", "missing; ranking records need"),
    "prompt-meta-not-object": ("prompt", {"prompt": "p", "meta": ["x"]}, "meta", "expected an object, got list"),
    "prompt-with-response-key": (None, {"prompt": "p", "response": "r"}, "response", "not a recognised field"),
}


@pytest.mark.parametrize("case", list(MALFORMED), ids=list(MALFORMED))
def test_malformed_record_error_names_file_line_and_field(tmp_path, case):
    good, bad, field, fragment = MALFORMED[case]
    lines = [bad] if good is None else [GOOD[good], None, bad]  # None: a blank line, still counted
    path = write_text(tmp_path, "bad.jsonl", "".join(("" if r is None else json.dumps(r)) + "\n" for r in lines))
    with pytest.raises(DataError) as info:
        read_records(path)
    assert str(info.value).startswith(f"{path}, line {len(lines)}: field '{field}': ")
    assert fragment in str(info.value)
    assert (info.value.line, info.value.field) == (len(lines), field)


def test_malformed_row_in_json_array_says_row(tmp_path):
    path = write(tmp_path, "bad.json", [GOOD["demo"], GOOD["demo"], {"prompt": 3, "completion": "c"}])
    with pytest.raises(DataError, match=r"bad\.json, row 3: field 'prompt': expected a string or a list"):
        read_records(path)


def test_malformed_row_in_parquet_says_row(tmp_path):
    path = write(tmp_path, "bad.parquet", [GOOD["demo"], {"prompt": "p", "completion": " "}])
    with pytest.raises(DataError, match=r"bad\.parquet, row 2: field 'completion': expected a non-empty"):
        read_records(path)


@pytest.mark.parametrize(
    "text, problem",
    [
        ('{"prompt": "a"}\n{"prompt": "b",\n', r"line 2: invalid JSON: Expecting property name enclosed in double quotes at column 16"),
        ('{"prompt": "a"}\n["prompt", "b"]\n', r"line 2: expected a JSON object \(a record\), got list"),
        ('{"question": "a", "reply": "b"}\n', r"line 1: unknown record format: found keys \['question', 'reply'\]; expected hh: .*preference: .*ranking: \{prompt, completions, ranking\}"),
    ],
    ids=["invalid-json", "row-not-object", "unknown-format"],
)
def test_unreadable_row_errors(tmp_path, text, problem):
    path = write_text(tmp_path, "rows.jsonl", text)
    with pytest.raises(DataError, match=rf"^{path}, {problem}"):
        read_records(path)


# ---------------------------------------------------------------------------------------------
# File-level errors
# ---------------------------------------------------------------------------------------------


def _corrupt_gzip(tmp_path: Path) -> Path:
    data = gzip.compress(b'{"prompt": "a"}\n' * 50)
    path = tmp_path / "data.jsonl.gz"
    path.write_bytes(data[: len(data) // 2])
    return path


FILE_ERRORS = {
    "not-found": (lambda t: t / "missing.jsonl", "no such file or directory"),
    "unsupported-extension": (lambda t: write_text(t, "d.csv", "a,b\n"), "unsupported file type; supported: .jsonl, .json, .parquet, .jsonl.gz"),
    "empty-file": (lambda t: write_text(t, "d.jsonl", "\n\n"), "no records: the file is empty"),
    "corrupted-gzip": (_corrupt_gzip, "corrupted gzip file"),
    "not-gzip-at-all": (lambda t: write_text(t, "d.json.gz", "[]"), "corrupted gzip file"),
    "json-top-level-string": (lambda t: write_text(t, "d.json", '"hello"'), "expected a top-level list of objects or an object with one list value"),
    "json-object-two-lists": (lambda t: write_text(t, "d.json", '{"a": [], "b": []}'), "got an object with keys ['a', 'b']"),
    "json-single-record": (lambda t: write_text(t, "d.json", json.dumps({"messages": [msg("user", "p")]})), "looks like a single record (key 'messages')"),
    "invalid-json-file": (lambda t: write_text(t, "d.json", '[\n{"prompt": "a"},\n{"prompt" "b"}\n]'), "line 3: invalid JSON: Expecting ':' delimiter"),
    "jsonl-named-json": (lambda t: write_text(t, "d.json", '{"prompt": "a"}\n{"prompt": "b"}\n'), "rename it to .jsonl"),
    "not-parquet": (lambda t: write_text(t, "d.parquet", "nope"), "not a readable Parquet file"),
    "directory-without-data": (lambda t: write_text(t, "notes.txt", "x").parent, "directory holds no data files"),
    "not-utf8": (lambda t: (t / "d.jsonl").write_bytes(b'{"prompt": "\xff"}\n') and t / "d.jsonl", "not UTF-8 text"),
}


@pytest.mark.parametrize("skip_bad", [False, True], ids=["strict", "skip_bad"])
@pytest.mark.parametrize("case", list(FILE_ERRORS), ids=list(FILE_ERRORS))
def test_file_level_errors_raise_even_with_skip_bad(tmp_path, case, skip_bad):
    make, fragment = FILE_ERRORS[case]
    path = make(tmp_path)
    with pytest.raises(DataError) as info:
        read_records(path, skip_bad=skip_bad)
    assert str(info.value).startswith(str(path))
    assert fragment in str(info.value)


def test_bad_utf8_names_its_line_and_can_be_skipped(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"prompt": "a"}\n{"prompt": "b\xff"}\n{"prompt": "c"}\n')
    with pytest.raises(DataError, match=r"d.jsonl, line 2: not UTF-8 text: byte 0xff at byte 14 of the line"):
        read_records(path)
    records, report = read_records(path, skip_bad=True)
    assert [r.messages[0].content for r in records] == ["a", "c"] and report.skipped_bad == 1
    json_file = tmp_path / "d.json"
    json_file.write_bytes(b'[\n{"prompt": "a"},\n{"prompt": "\xff"}\n]')
    with pytest.raises(DataError, match=r"d.json, line 3: not UTF-8 text: byte 0xff"):
        read_records(json_file)


@pytest.mark.parametrize("name", ["d.jsonl", "d.json", "d.jsonl.gz"])
def test_a_utf8_byte_order_mark_is_read(tmp_path, name):
    """Windows tools write one at the start of UTF-8 files; json refused it."""
    rows = [{"prompt": "a"}, {"prompt": "b"}]
    text = json.dumps(rows) if name == "d.json" else "".join(json.dumps(r) + "\n" for r in rows)
    data = b"\xef\xbb\xbf" + text.encode()
    (tmp_path / name).write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    records, _ = read_records(tmp_path / name)
    assert [r.messages[0].content for r in records] == ["a", "b"]


@pytest.mark.parametrize("name", ["d.jsonl", "d.json"])
def test_deeply_nested_json_is_a_data_error_not_a_recursion_error(tmp_path, name):
    deep = "[" * 20_000 + "]" * 20_000
    write_text(tmp_path, name, f'[{{"prompt": "a", "meta": {{"x": {deep}}}}}]' if name == "d.json"
               else f'{{"prompt": "a"}}\n{{"prompt": "b", "meta": {{"x": {deep}}}}}\n')
    where = "d.json" if name == "d.json" else "d.jsonl, line 2"
    with pytest.raises(DataError, match=f"{where}: invalid JSON: nested too deeply to read"):
        read_records(tmp_path / name)


def test_pairs_that_prefer_an_empty_response_are_counted_and_a_file_of_only_those_refused(tmp_path):
    """The world's own comparisons prefer silence to a wrong answer 191 times in 12,000; a file
    where every chosen response is empty has its preferred answers in another field."""
    rows = [{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "q", "chosen": " ", "rejected": "wrong"}]
    records, report = read_records(write(tmp_path, "pairs.jsonl", rows))
    assert len(records) == 2 and "1 pairs prefer an empty response" in report.summary()
    with pytest.raises(DataError, match="pairs.jsonl: field 'chosen': empty in all 1 pairs; is the preferred"):
        read_records(write(tmp_path, "pairs.jsonl", rows[1:]))


def test_a_completion_given_twice_is_kept_once_at_its_better_rank_and_counted(tmp_path):
    """Two identical samples ranked apart (a labeller must order them) would be pairs of a text
    against itself; copies that are all a ranking has left are all tied and dropped."""
    rows = [{"prompt": "p", "completions": ["a", "b", "a", "c"], "ranking": [2, 1, 0, 3]},
            {"prompt": "q", "completions": ["x", "x"], "ranking": [0, 1]}]
    records, report = read_records(write(tmp_path, "r.jsonl", rows))
    assert records == [Ranking(user("p"), ("a", "b", "c"), (0, 1, 2))]
    assert report.merged_duplicates == 2 and report.dropped_all_tied == 1
    assert "2 rankings gave a completion twice: kept once, at its better rank" in report.summary()


def test_all_tied_rankings_carry_no_preference_and_are_dropped_and_counted(tmp_path):
    rows = [{"prompt": "p", "completions": ["a", "b"], "ranking": [0, 1]},
            {"prompt": "q", "completions": ["a", "b", "c"], "ranking": [1, 1, 1]}]
    records, report = read_records(write(tmp_path, "r.jsonl", rows))
    assert len(records) == 1 and report.dropped_all_tied == 1
    assert "dropped 1 rankings whose completions are all tied" in report.summary()
    with pytest.raises(DataError, match="no usable records; 1 rankings had all their completions tied"):
        read_records(write(tmp_path, "tied.jsonl", rows[1:]))


def test_hub_name_that_cannot_be_reached(monkeypatch):
    import datasets

    def offline(name, split):
        raise ConnectionError(f"Couldn't reach '{name}' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match=r"^someone/prefs: no such file or directory, and the Hugging Face hub could not be reached"):
        read_records("someone/prefs")


def test_hub_dataset_rows_are_read(monkeypatch):
    import datasets

    calls = []

    def load(name, split):
        calls.append((name, split))
        return datasets.Dataset.from_list([GOOD["demo"]])

    monkeypatch.setattr(datasets, "load_dataset", load)
    records, _ = read_records("someone/sft", split="test")
    assert records == [Demonstration(user("p"), "c")] and calls == [("someone/sft", "test")]


def test_path_like_names_are_not_sent_to_the_hub(monkeypatch):
    import datasets

    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("hub was queried"))
    for name in ("data/train.jsonl", "./prefs", "/no/such/dir"):
        with pytest.raises(DataError, match="no such file or directory$"):
            read_records(name)


def test_directory_mixing_formats(tmp_path):
    write(tmp_path, "a.jsonl", [GOOD["demo"]])
    write(tmp_path, "b.jsonl", [GOOD["prompt"]])
    with pytest.raises(DataError, match=r"b\.jsonl: holds prompt records but .*a\.jsonl holds demonstration records"):
        read_records(tmp_path)


# ---------------------------------------------------------------------------------------------
# skip_bad, limit and the report
# ---------------------------------------------------------------------------------------------


def test_skip_bad_counts_and_keeps_the_first_problems(tmp_path):
    lines = [
        json.dumps(GOOD["pref"]),
        "{not json",
        json.dumps(GOOD["pref"]),
        "[1, 2]",
        json.dumps({"prompt": "p", "chosen": 7, "rejected": "b"}),
        json.dumps({"prompt": "p", "chosen": "same", "rejected": "same"}),
    ] + [json.dumps({"prompt": 1, "chosen": "a", "rejected": "b"})] * 5
    path = write_text(tmp_path, "mixed.jsonl", "\n".join(lines) + "\n")
    records, report = read_records(path, skip_bad=True)
    assert len(records) == 2
    assert (report.records, report.skipped_bad, report.dropped_identical) == (2, 8, 1)
    assert len(report.problems) == 5
    assert report.problems[0].startswith(f"{path}, line 2: invalid JSON")
    assert report.problems[2].startswith(f"{path}, line 5: field 'chosen'")
    with pytest.raises(DataError, match="line 2: invalid JSON"):
        read_records(path)


def test_skip_bad_skips_an_undetectable_first_row(tmp_path):
    path = write_text(tmp_path, "d.jsonl", '{"x": 1}\n' + json.dumps(GOOD["rank"]) + "\n")
    records, report = read_records(path, skip_bad=True)
    assert report.format is Format.RANKING and report.skipped_bad == 1 and len(records) == 1


def test_nothing_usable_is_an_error(tmp_path):
    path = write(tmp_path, "d.jsonl", [{"prompt": 1}, {"prompt": 2}])
    with pytest.raises(DataError, match=r"no usable records; all 2 malformed records were skipped, first: .*line 1: field 'prompt'"):
        read_records(path, skip_bad=True)


def test_limit_stops_reading_before_later_bad_rows(tmp_path):
    path = write_text(tmp_path, "d.jsonl", "\n".join([json.dumps(GOOD["demo"])] * 3 + ["{broken"]))
    records, report = read_records(path, limit=2)
    assert len(records) == 2 and report.records == 2
    with pytest.raises(DataError, match="line 4"):
        read_records(path, limit=4)


def test_report_summary_mentions_every_count():
    report = ReadReport("f.jsonl", Format.HH, 10, 3, 2, 1, ["f.jsonl, line 4: field 'chosen': bad"])
    text = report.summary()
    for fragment in ("f.jsonl: 10 records (hh)", "dropped 2 pairs", "1 pairs whose transcripts",
                     "skipped 3 malformed", "line 4: field 'chosen': bad"):
        assert fragment in text


# ---------------------------------------------------------------------------------------------
# hh-rlhf edge cases
# ---------------------------------------------------------------------------------------------


def test_hh_identical_pair_is_dropped_and_counted(tmp_path):
    same = hh("Hi", "Hello")
    path = write(tmp_path, "hh.jsonl", [SAMPLES["hh"][1][0], {"chosen": same, "rejected": same}])
    records, report = read_records(path)
    assert records == [SAMPLES["hh"][2][0]]
    assert report.dropped_identical == 1 and report.resplit_prefix_mismatch == 0


def test_hh_prefix_mismatch_is_resplit_keeping_the_chosen_prompt(tmp_path):
    row = {"chosen": hh("Hi", "Hey", "How are you?", "Fine."), "rejected": hh("Hi", "Yo", "How are you?", "Bad.")}
    records, report = read_records(write(tmp_path, "hh.jsonl", [row]))
    assert records == [
        Comparison(
            (Message("user", "Hi"), Message("assistant", "Hey"), Message("user", "How are you?")),
            "Fine.",
            "Bad.",
        )
    ]
    assert report.resplit_prefix_mismatch == 1


def test_hh_multi_turn_prompt_keeps_every_turn_stripped():
    turns = [f"  turn {i}  " for i in range(50)]  # 25 Human turns, the most hh-rlhf has
    record = parse_row({"chosen": hh(*turns), "rejected": hh(*turns[:-1], "other")}, Format.HH, "x", 1)
    assert [m.role for m in record.prompt] == ["user", "assistant"] * 24 + ["user"]
    assert [m.content for m in record.prompt] == [f"turn {i}" for i in range(49)]
    assert (record.chosen, record.rejected) == ("turn 49", "other")


def test_hh_transcript_may_start_without_blank_lines_and_keeps_inline_markers():
    row = {"chosen": "Human: a Human: b\n\nAssistant: c", "rejected": "Human: a Human: b\n\nAssistant: d"}
    assert parse_row(row, Format.HH, "x", 1) == Comparison(user("a Human: b"), "c", "d")


def test_judged_responses_may_be_empty_but_demonstrations_may_not(tmp_path):
    """An empty answer is a real outcome labelers rank (the world's candidates include one)."""
    rows = [{"prompt": "p", "chosen": "a", "rejected": ""},
            {"prompt": "p", "chosen": [msg("assistant", "a")], "rejected": [msg("assistant", " ")]},
            {"chosen": [msg("user", "p"), msg("assistant", "a")], "rejected": [msg("user", "p"), msg("assistant", "")]}]
    records, _ = read_records(write(tmp_path, "pairs.jsonl", rows))
    assert [r.rejected for r in records] == ["", " ", ""]
    ranking = {"prompt": "p", "completions": ["a", ""], "ranking": [0, 1]}
    [record], _ = read_records(write(tmp_path, "ranks.jsonl", [ranking]))
    assert record.completions == ("a", "")
    with pytest.raises(DataError, match="completion.*non-empty response"):
        read_records(write(tmp_path, "demo.jsonl", [{"prompt": "p", "completion": ""}]))


def test_preference_with_identical_responses_is_dropped(tmp_path):
    rows = [GOOD["pref"], {"prompt": "p", "chosen": [msg("assistant", "x")], "rejected": [msg("assistant", "x")]}]
    records, report = read_records(write(tmp_path, "p.jsonl", rows))
    assert len(records) == 1 and report.dropped_identical == 1


# ---------------------------------------------------------------------------------------------
# Typed wrappers
# ---------------------------------------------------------------------------------------------


def test_read_comparisons_expands_rankings_to_pairs(tmp_path):
    row = {"prompt": "p", "completions": ["a", "b", "c"], "ranking": [2, 0, 2]}
    pairs, report = read_comparisons(write(tmp_path, "r.jsonl", [row]))
    assert pairs == [Comparison(user("p"), "b", "a"), Comparison(user("p"), "b", "c")]
    assert report.format is Format.RANKING


@pytest.mark.parametrize(
    "reader, sample, expected_type",
    [
        (read_demonstrations, "demonstration-messages", Demonstration),
        (read_comparisons, "hh", Comparison),
        (read_rankings, "ranking", Ranking),
        (read_prompts, "prompt", Prompt),
    ],
)
def test_typed_readers_accept_their_kind(tmp_path, reader, sample, expected_type):
    records, _ = reader(write(tmp_path, "d.jsonl", SAMPLES[sample][1]), limit=1)
    assert len(records) == 1 and isinstance(records[0], expected_type)


@pytest.mark.parametrize(
    "reader, sample, message",
    [
        (read_demonstrations, "preference-strings", "holds comparisons (preference format), expected demonstrations; pass a file of prompt/completion or messages records"),
        (read_comparisons, "prompt", "holds prompts (prompt format), expected comparisons"),
        (read_rankings, "hh", "holds comparisons (hh format), expected rankings"),
        (read_prompts, "ranking", "holds rankings (ranking format), expected prompts; pass a file of prompt records, or format='prompt'"),
    ],
)
def test_typed_readers_reject_other_kinds(tmp_path, reader, sample, message):
    path = write(tmp_path, "d.jsonl", SAMPLES[sample][1])
    with pytest.raises(DataError, match="^" + re.escape(f"{path}: {message}")):
        reader(path, skip_bad=True)


def test_typed_reader_rejects_a_forced_format_of_another_kind(tmp_path):
    path = write(tmp_path, "r.jsonl", SAMPLES["ranking"][1])
    with pytest.raises(ConfigError, match="format='ranking' reads rankings, but demonstrations are expected"):
        read_demonstrations(path, format="ranking")


def test_typed_reader_rejects_unknown_options(tmp_path):
    with pytest.raises(TypeError, match="skipbad"):
        read_prompts(tmp_path / "x.jsonl", skipbad=True)

