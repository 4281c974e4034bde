"""Sampling stages resume after an interruption: the labels stage's rankings, the pipeline's
evaluation, `rlhfkit eval` and best-of-N write the same bytes when interrupted (kill -9, or an
exception between chunks) and resumed as when run straight through, and the resumed run samples
only the chunks that were missing."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import rlhfkit.rankings as preferences
import rlhfkit.eval.bon as bon
import rlhfkit.eval.evaluate as evaluate_cli
import rlhfkit.generation as rollout
from rlhfkit.chunks import PartialFile
from rlhfkit.cli import parse
from rlhfkit.config import ModelConfig, PreferenceDataConfig
from rlhfkit.errors import RlhfkitError
from rlhfkit.eval.headline import evaluate_run
from rlhfkit.models import load_model, save_model
from rlhfkit.pipeline import EvalStageConfig

ROOT = Path(__file__).resolve().parents[1]
# 24 + 6 world prompts, 2 policy samples each, 8 samples (4 prompts) a chunk: 6 + 2 chunks.
LABELS = {"train": "world", "responses": "mixed", "world_prompts": 24, "world_eval_prompts": 6, "k": 4,
          "max_new_tokens": 8}
TINY = ModelConfig(name="tiny", precision="fp32")


@pytest.fixture(autouse=True)
def one_thread():
    """One thread, as in the kill -9 child, so chunks sampled there and here are the same floats;
    on this 2-core machine shared with other jobs, two threads were also 40x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Interrupted(Exception):
    pass


def count_generate(monkeypatch, module, stop_after: int | None = None) -> list:
    """Count ``module.generate``'s calls (one per chunk); raise Interrupted instead of the call
    after ``stop_after`` of them."""
    real, calls = getattr(module.generate, "unpatched", module.generate), []

    def generate(*args, **kwargs):
        if len(calls) == stop_after:
            raise Interrupted
        calls.append(kwargs.get("generator_seed"))
        return real(*args, **kwargs)

    generate.unpatched = real
    monkeypatch.setattr(module, "generate", generate)
    return calls


def chunks_in(partial: Path) -> int:
    """Whole chunk lines in a partial file (after its settings line)."""
    return max(0, partial.read_bytes().count(b"\n") - 1) if partial.exists() else 0


KILLED_CHILD = """
import sys, time
from pathlib import Path
import torch
import rlhfkit.generation as generation
import rlhfkit.rankings as preferences
from rlhfkit.config import ModelConfig, PreferenceDataConfig

torch.set_num_threads(1)
real = generation.generate

def slow(*args, **kwargs):  # time for the parent to kill between (or inside) chunks
    time.sleep(0.3)
    return real(*args, **kwargs)

generation.generate = slow  # every chunk's sampling goes through it
preferences.load_rankings(PreferenceDataConfig(**{labels}), ModelConfig(name="tiny", precision="fp32"), 0,
                          Path(sys.argv[1]), chunk=8)
"""


def test_labels_killed_mid_sampling_resume_to_the_same_rankings(tmp_path, monkeypatch, capsys):
    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen([sys.executable, "-c", KILLED_CHILD.format(labels=LABELS), str(killed)], env=env, cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    partial = killed / "data" / "train_rankings.partial.jsonl"
    deadline = time.time() + 120
    while chunks_in(partial) < 1:
        assert child.poll() is None, child.stdout.read()
        assert time.time() < deadline, "no chunk was sampled"
        time.sleep(0.01)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert not (killed / "data" / "train_rankings.jsonl").exists(), "sampling finished before the kill"
    sampled = chunks_in(partial)
    assert 1 <= sampled < 6
    straight = tmp_path / "straight"
    preferences.load_rankings(PreferenceDataConfig(**LABELS), TINY, 0, straight, chunk=8)

    capsys.readouterr()
    calls = count_generate(monkeypatch, rollout)
    preferences.load_rankings(PreferenceDataConfig(**LABELS), TINY, 0, killed, chunk=8)
    assert f"labels (train): resuming, {sampled}/6 chunks already sampled" in capsys.readouterr().out
    assert len(calls) == 6 - sampled + 2  # the train chunks left, and both eval chunks
    for name in ("train_rankings.jsonl", "eval_rankings.jsonl"):
        assert (killed / "data" / name).read_bytes() == (straight / "data" / name).read_bytes(), name
    assert sorted(p.name for p in (killed / "data").iterdir()) == ["eval_rankings.jsonl", "train_rankings.jsonl"]


def test_a_torn_last_line_is_dropped_and_other_settings_start_again(tmp_path, capsys):
    """A chunk line cut short by the kill is not read back (it is sampled again), and the file is
    trimmed so the next chunk follows whole lines; a partial file of other settings is not mixed
    in. Row counts are checked: a line with the wrong count ends what is read."""
    path = tmp_path / "x.partial.jsonl"
    log = PartialFile(path, {"n": 3}, [2, 2, 1], "x")
    assert log.load() == [] and not path.exists()
    log.append([["a"], ["b"]])
    log.append([["c"], ["d"]])
    whole = path.read_bytes()
    path.write_bytes(whole[:-5])  # the second chunk's line, torn
    log = PartialFile(path, {"n": 3}, [2, 2, 1], "x")
    assert log.load() == [[["a"], ["b"]]] and log.count == 1
    assert "x: resuming, 1/3 chunks already sampled" in capsys.readouterr().out
    log.append([["c"], ["d"]])
    assert path.read_bytes() == whole
    assert PartialFile(path, {"n": 3}, [2, 1, 1], "x").load() == [[["a"], ["b"]]]  # chunk 1 holds 2 rows, not 1
    with pytest.raises(ValueError, match="chunk 2: 2 rows, expected 1"):
        log.append([["e"], ["f"]])
    capsys.readouterr()
    assert PartialFile(path, {"n": 4}, [2, 2, 1], "x").load() == []
    assert "x: " + str(path) + " was sampled with other settings; sampling again" in capsys.readouterr().out
    assert not path.exists()


def test_the_eval_stage_resumes_to_the_same_eval_json(tmp_path, monkeypatch, tiny_tokenizer):
    models = {"base": "tiny"}
    for name, seed in (("sft", 1), ("ppo", 2)):  # other random inits of the tiny model
        save_model(load_model(ModelConfig(), tiny_tokenizer, seed=seed), tiny_tokenizer, tmp_path / name)
        models[name] = str(tmp_path / name)
    cfg = EvalStageConfig(prompts=12, max_new_tokens=8, batch_size=4, report_samples=2, precision="fp32")
    run = lambda out: evaluate_run(models, rl="ppo", judge="gold", prompts="world", cfg=cfg, out=out, chunk=4)  # noqa: E731
    run(tmp_path / "straight")

    out = tmp_path / "eval"
    count_generate(monkeypatch, rollout, stop_after=8)
    with pytest.raises(Interrupted):  # inside the SFT model's sampled answers
        run(out)
    assert sorted(p.name for p in out.iterdir()) == ["eval.partial.jsonl"]  # no complete.json: not finished
    assert chunks_in(out / "eval.partial.jsonl") == 8
    calls = count_generate(monkeypatch, rollout)
    run(out)
    assert len(calls) == 3 * 2 * 3 - 8  # models x decodings x chunks, less those already answered
    for name in ("eval.json", "complete.json"):
        assert (out / name).read_bytes() == (tmp_path / "straight" / name).read_bytes(), name
    assert not (out / "eval.partial.jsonl").exists()
    result = json.loads((out / "eval.json").read_text())
    assert result["models"]["ppo"]["kl_to_sft"] is not None and result["prompts"] == 12


def test_rlhfkit_eval_resumes_to_the_same_report(tmp_path, monkeypatch, tiny_tokenizer):
    save_model(load_model(ModelConfig(), tiny_tokenizer, seed=1), tiny_tokenizer, tmp_path / "other")
    out = tmp_path / "eval.json"
    args = ["--model", "tiny", "--against", str(tmp_path / "other"), "--n-prompts", "8", "--max-new-tokens", "8",
            "--batch-size", "4", "--temperature", "1", "--precision", "fp32", "--out", str(out)]
    evaluate_cli.evaluate(parse("eval", args), chunk=3)
    straight = out.read_bytes()  # the report names --out: the resumed run writes to the same path
    out.unlink()
    count_generate(monkeypatch, rollout, stop_after=4)
    with pytest.raises(Interrupted):  # inside the other model's answers
        evaluate_cli.evaluate(parse("eval", args), chunk=3)
    assert not out.exists() and chunks_in(tmp_path / "eval.partial.jsonl") == 4
    calls = count_generate(monkeypatch, rollout)
    evaluate_cli.evaluate(parse("eval", args), chunk=3)
    assert len(calls) == 2 and out.read_bytes() == straight
    assert not (tmp_path / "eval.partial.jsonl").exists()


def test_best_of_n_resumes_to_the_same_file(tmp_path, monkeypatch):
    def run(out: Path) -> dict:
        return bon.best_of_n(parse("bon", ["--model", "tiny", "--reward", "gold", "--n", "4", "--num-prompts", "10",
                                           "--max-new-tokens", "8", "--precision", "fp32", "--out", str(out)]), chunk=8)

    straight = run(tmp_path / "straight.jsonl")
    count_generate(monkeypatch, rollout, stop_after=2)
    with pytest.raises(Interrupted):
        run(tmp_path / "bon.jsonl")
    assert chunks_in(tmp_path / "bon.partial.jsonl") == 2 and not (tmp_path / "bon.jsonl").exists()
    calls = count_generate(monkeypatch, rollout)
    assert run(tmp_path / "bon.jsonl") == straight
    assert len(calls) == 5 - 2
    assert (tmp_path / "bon.jsonl").read_bytes() == (tmp_path / "straight.jsonl").read_bytes()
    assert not (tmp_path / "bon.partial.jsonl").exists()


def test_a_reward_model_stage_that_stops_mid_sampling_keeps_its_samples(tmp_path, monkeypatch, capsys):
    """`rlhfkit rm` removes the folder of a fresh run that stops on a user's mistake before any
    progress; sampled chunks are progress: kept, and --run.resume continues from them."""
    from rlhfkit.train.rm import train

    out = tmp_path / "rm"
    args = ["--recipe", "tiny", "--model.name", "tiny", "--model.precision", "fp32", "--data.responses", "policy",
            "--data.k", "2", "--data.world-prompts", "80", "--data.world-eval-prompts", "0", "--data.max-new-tokens", "4",
            "--run.steps", "2", "--run.save-every", "10", "--run.out", str(out)]
    real = rollout.generate

    def generate(*a, **kw):
        if (out / "data" / "train_rankings.partial.jsonl").exists():
            raise RlhfkitError("stopped after the first chunk")
        return real(*a, **kw)

    monkeypatch.setattr(rollout, "generate", generate)
    with pytest.raises(RlhfkitError, match="stopped after the first chunk"):
        train(parse("rm", args))
    assert chunks_in(out / "data" / "train_rankings.partial.jsonl") == 1  # 128 samples a chunk: 64 of 80 prompts
    monkeypatch.setattr(rollout, "generate", real)
    calls = count_generate(monkeypatch, rollout)
    capsys.readouterr()
    train(parse("rm", [*args, "--run.resume"]))
    assert "resuming, 1/2 chunks already sampled" in capsys.readouterr().out and len(calls) == 1
    assert (out / "complete.json").exists() and not (out / "data" / "train_rankings.partial.jsonl").exists()
