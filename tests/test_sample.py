"""`rlhfkit sample`: world prompts with gold scores, user prompt files (text and messages), clear
errors for bad files, greedy determinism."""

import json

import pytest

from rlhfkit.cli import main
from rlhfkit.data.records import messages_to_dicts
from rlhfkit.data.world import World
from rlhfkit.errors import ConfigError
from rlhfkit.serve.sample import SampleConfig, sample


@pytest.fixture(scope="module")
def tiny_folder(tiny_tokenizer, tmp_path_factory):
    """The tiny model saved as a model folder, so each run loads it instead of training the tiny
    tokenizer again."""
    from rlhfkit.models import build_tiny_model, save_model

    folder = tmp_path_factory.mktemp("sample") / "tiny"
    save_model(build_tiny_model(tiny_tokenizer), tiny_tokenizer, folder)
    return str(folder)


def read(path) -> list[dict]:
    return [json.loads(line) for line in open(path)]


def test_world_prompts_n_samples_each_with_gold_scores(tiny_folder, tmp_path):
    out = tmp_path / "samples.jsonl"
    sample(SampleConfig(model=tiny_folder, prompts="world", n_prompts=8, n=2, max_new_tokens=16, out=str(out)))
    rows = read(out)
    assert len(rows) == 16
    expected = [messages_to_dicts(p.messages) for p in World(seed=0).prompts(8, "eval")]
    assert [r["prompt"] for r in rows] == [p for p in expected for _ in range(2)]  # prompt-major order
    assert [r["sample"] for r in rows] == [0, 1] * 8
    for r in rows:
        assert set(r) == {"prompt", "completion", "finished", "tokens", "sample", "gold_score"}
        assert isinstance(r["completion"], str) and 0 <= r["gold_score"] <= 1
        assert 0 < r["tokens"] <= 16 and (r["finished"] or r["tokens"] == 16)
    assert not (tmp_path / "samples.jsonl.tmp").exists()


def test_prompt_file_with_text_and_messages_through_the_cli(tiny_folder, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."},
                    {"role": "assistant", "content": "Red."}, {"role": "user", "content": "Another one?"}]
    # The first row decides nothing: a demonstration's prompt is answered like any other.
    lines = [{"prompt": "Demonstration rows work too.", "completion": "ignored"}, {"prompt": conversation},
             {"prompt": "Name three fruits.", "id": 1}]
    prompts.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "out" / "samples.jsonl"
    main(["sample", "--model", tiny_folder, "--prompts", str(prompts), "--out", str(out), "--max-new-tokens", "8",
          "--temperature", "0"])
    rows = read(out)
    assert [r["prompt"] for r in rows] == [[{"role": "user", "content": "Demonstration rows work too."}],
                                           conversation, [{"role": "user", "content": "Name three fruits."}]]
    assert all("gold_score" not in r and r["sample"] == 0 for r in rows)  # not world prompts: nothing to judge
    assert f"wrote 3 samples -> {out}" in capsys.readouterr().out
    # n_prompts caps a file
    sample(SampleConfig(model=tiny_folder, prompts=str(prompts), n_prompts=2, max_new_tokens=4, out=str(out)))
    assert len(read(out)) == 2


def test_world_export_file_is_gold_scored(tiny_folder, tmp_path):
    from rlhfkit.data.world import export

    paths = export(World(seed=0), tmp_path / "world", 4, 3, k=2)
    out = tmp_path / "samples.jsonl"
    sample(SampleConfig(model=tiny_folder, prompts=str(paths["eval_prompts"]), max_new_tokens=4, out=str(out)))
    assert [("gold_score" in r) for r in read(out)] == [True] * 3


@pytest.mark.parametrize("line, field", [('{"prompt": 5}', "prompt"), ('{"question": "hi"}', "prompt"),
                                         ('{"prompt": [{"role": "bot", "content": "x"}]}', "prompt[0].role"),
                                         ("not json", None)])
def test_bad_rows_name_file_line_and_field(tiny_folder, tmp_path, capsys, line, field):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n' + line + "\n")
    out = tmp_path / "samples.jsonl"
    with pytest.raises(SystemExit) as exit_info:
        main(["sample", "--model", tiny_folder, "--prompts", str(bad), "--out", str(out)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"{bad}, line 2" in err and "Traceback" not in err
    if field:
        assert f"field '{field}'" in err
    assert not out.exists()


def test_missing_file_is_a_clear_error(tiny_folder, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["sample", "--model", tiny_folder, "--prompts", str(tmp_path / "nope.jsonl")])
    assert f"{tmp_path / 'nope.jsonl'}: no such file or directory" in capsys.readouterr().err


def test_greedy_is_deterministic_and_answers_each_prompt(tiny_folder, tmp_path):
    """Prompts are sorted by length and generated a chunk at a time; every completion must still
    land on its own prompt: the same as generating for that prompt alone."""
    from transformers import AutoTokenizer

    from rlhfkit.config import ModelConfig
    from rlhfkit.models import load_model
    from rlhfkit.generation import generate

    outs = [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]
    for out in outs:  # batch_size 1: no padding (exact match below); 6 prompts make 2 chunks of 4
        sample(SampleConfig(model=tiny_folder, n_prompts=6, max_new_tokens=12, temperature=0, batch_size=1,
                            out=str(out)))
    assert outs[0].read_text() == outs[1].read_text()
    tokenizer = AutoTokenizer.from_pretrained(tiny_folder)
    model = load_model(ModelConfig(name=tiny_folder), tokenizer)
    alone = [generate(model, tokenizer, [p.messages], 12)[0].text for p in World(seed=0).prompts(6, "eval")]
    assert [r["completion"] for r in read(outs[0])] == alone
    with pytest.raises(ConfigError, match="identical samples"):
        sample(SampleConfig(model=tiny_folder, n=2, temperature=0))


def test_sampling_is_seeded_and_samples_differ(tiny_folder, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Name three fruits."}\n{"prompt": "Say hi."}\n')
    runs = []
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        out = tmp_path / f"{name}.jsonl"
        sample(SampleConfig(model=tiny_folder, prompts=str(prompts), n=2, max_new_tokens=12, seed=seed, out=str(out)))
        runs.append([r["completion"] for r in read(out)])
    assert runs[0] == runs[1]  # same seed, same samples
    assert runs[0][0] != runs[0][1]  # the n samples of one prompt differ
    assert runs[0] != runs[2]  # another seed, other samples
