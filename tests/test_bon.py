"""Best-of-N on the tiny model: with the gold judge as the reward, picking the best of N cannot
lose to plain sampling, and the output file is SFT data."""

from rlhfkit.cli import parse
from rlhfkit.data.formats import read_demonstrations
from rlhfkit.eval.bon import best_of_n


def test_best_of_n_with_the_gold_judge_beats_plain_sampling(tmp_path):
    out = tmp_path / "bon.jsonl"
    metrics = best_of_n(parse("bon", ["--model", "tiny", "--reward", "gold", "--n", "4", "--num-prompts", "40",
                                      "--max-new-tokens", "8", "--out", str(out)]))
    assert metrics["bon/gold_best"] >= metrics["bon/gold_plain"]
    assert metrics["bon/reward_best"] == metrics["bon/gold_best"]  # the reward is the gold judge
    assert metrics["bon/vs_plain_win_rate"] >= 0.5 and metrics["bon/vs_plain_losses"] == 0
    demos, _ = read_demonstrations(out)
    assert len(demos) == 40  # rejection-sampling data, readable by `rlhfkit sft --data.train`
