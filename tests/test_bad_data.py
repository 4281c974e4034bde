"""User data that is malformed, odd or huge, through `rlhfkit sft / rm / dpo` as a user runs them:
refused with one line naming the file, line and field, exit 2, no traceback and no output
folder; or read correctly."""

import json
from pathlib import Path

import pytest

from cli_errors import refused

from rlhfkit.cli import main
from rlhfkit.data.records import prompt_bucket, user

COMMON = ["--recipe", "tiny", "--model.name", "tiny", "--run.steps", "1", "--batch.micro-batch-size", "1"]
NO_GOLD = ["--eval.gold-prompts", "0", "--eval.no-at-start"]


def args(stage: str, data: Path, out: Path) -> list[str]:
    return [stage, *COMMON, *([] if stage == "rm" else NO_GOLD), "--data.train", str(data), "--run.out", str(out)]


def jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


PAIR = {"prompt": "What is 2 + 2?", "chosen": "4", "rejected": "5"}
RANKING = {"prompt": "What is 2 + 2?", "completions": ["4", "5", "four"], "ranking": [0, 2, 1]}
DEEP = "[" * 20_000 + "]" * 20_000

# case -> (stage, rows, what the one-line error says)
BAD = {
    "deeply-nested-json": ("rm", [PAIR, f'{{"prompt": "p", "chosen": "a", "rejected": "b", "meta": {DEEP}}}'],
                           "data.jsonl, line 2: invalid JSON: nested too deeply to read"),
    "lone-surrogate": ("dpo", [PAIR, '{"prompt": "p \\ud800", "chosen": "a", "rejected": "b"}'],
                       "data.jsonl, line 2: field 'prompt': not valid Unicode text: a lone surrogate"),
    "rank-beyond-completions": ("rm", [RANKING, {**RANKING, "ranking": [0, 5, 1]}],
                                "data.jsonl, line 2: field 'ranking[1]': expected the rank of completion 1, an "
                                "integer from 0 (best) to 2, got 5"),
    "only-copies-of-one-text": ("rm", [{**RANKING, "completions": ["4", "4", "4"]}] * 2,
                                "no usable records; 2 rankings had all their completions tied"),
    "all-tied-rankings": ("rm", [{**RANKING, "ranking": [0, 0, 0]}] * 3,
                          "no usable records; 3 rankings had all their completions tied"),
    "every-chosen-empty": ("dpo", [{**PAIR, "chosen": ""}, {**PAIR, "prompt": "What is 3 + 3?", "chosen": " "}],
                           "data.jsonl: field 'chosen': empty in all 2 pairs"),
    "bad-utf8": ("sft", [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}],
                 "data.jsonl, line 2: not UTF-8 text: byte 0xff at byte 13 of the line"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_data_is_refused_with_file_line_and_field_and_leaves_no_folder(case, tmp_path, capsys):
    stage, rows, message = BAD[case]
    data = jsonl(tmp_path / "data.jsonl", rows)
    if case == "bad-utf8":
        data.write_bytes(data.read_bytes().replace(b'"c"', b'"\xff"'))
    error = refused(args(stage, data, tmp_path / "out"), capsys)
    assert message in error, error
    assert not (tmp_path / "out").exists()


def test_a_file_with_a_byte_order_mark_trains(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_bytes(b"\xef\xbb\xbf" + b"".join(json.dumps({"prompt": f"Say {w}", "completion": w}).encode() + b"\n"
                                              for w in ("yes", "no", "maybe")))
    main([*args("sft", data, tmp_path / "out"), "--data.eval-fraction", "0"])
    assert (tmp_path / "out" / "complete.json").exists()


def test_a_huge_field_is_cut_before_tokenising_and_the_cut_reported(tmp_path, capsys):
    """20 MB of response text (tokenised whole it took ~4 GB and minutes): cut to max_seq_len's
    worth of characters first, and the truncation is said."""
    rows = [{"prompt": "Tell a long story", "completion": "once upon a time " * 1_200_000}, PAIR | {"completion": "4"}]
    rows[1].pop("chosen"), rows[1].pop("rejected")
    data = jsonl(tmp_path / "data.jsonl", rows)
    assert data.stat().st_size > 20_000_000
    main([*args("sft", data, tmp_path / "out"), "--data.eval-fraction", "0"])
    assert "1 lost the end of their response" in capsys.readouterr().out


def test_one_record_with_nothing_held_out_says_so(tmp_path, capsys):
    prompt = next(f"Question {i}?" for i in range(100) if prompt_bucket(user(f"Question {i}?")) >= 0.15)
    data = jsonl(tmp_path / "data.jsonl", [{**PAIR, "prompt": prompt}])
    main(args("rm", data, tmp_path / "out"))
    assert "none of its 1 records fell in the held-out share (eval_fraction 0.15), so nothing is evaluated" in \
        capsys.readouterr().out
