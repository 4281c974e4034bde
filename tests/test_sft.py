"""The SFT stage end to end on the tiny model and the built-in world.

Learning test (loss falls, gold score rises); 2 processes: test_processes.py, resume: test_resume.py.
"""

import json
from pathlib import Path

from rlhfkit.cli import parse
from rlhfkit.train import sft


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_sft_tiny_lowers_loss_and_raises_gold_score(tmp_path):
    cfg = parse("sft", ["--recipe", "tiny", "--run.out", str(tmp_path / "sft")])
    out = sft.train(cfg)
    rows = metrics(out)
    start, end = rows[0], rows[-1]
    assert start["step"] == 0 and end["step"] == cfg.run.steps
    train_losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert sum(train_losses[-10:]) / 10 < 0.6 * sum(train_losses[:10]) / 10
    assert end["eval/loss"] < 0.6 * start["eval/loss"]
    assert end["eval/gold_score"] > start["eval/gold_score"] + 0.15, (start, end)
    # the output folder is a plain Hugging Face model
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(out) is not None
    assert (out / "complete.json").exists() and (out / "config.yaml").exists()
