"""eval/scorers.py: one resolver from a spec (gold, an RM folder, module:function) to a scorer."""

import pytest

from rlhfkit.data.world import World
from rlhfkit.errors import RlhfkitError
from rlhfkit.eval.scorers import reward_function

SEEN = []


def length_reward(prompts, responses):
    SEEN.append(prompts)
    return [len(r) for r in responses]  # ints: the scorer returns floats


def test_gold_scores_are_the_world_judge_and_a_pair_judge():
    world = World(seed=3)
    prompts = world.prompts(4, "eval")
    answers = [world.demonstrate(p) for p in prompts[:2]] + ["no idea", ""]
    scorer = reward_function("gold", world_seed=3)
    assert scorer(prompts, answers) == [s.score for s in world.judge_many(prompts, answers)]
    # the demonstrations beat the non-answers; a response against itself ties
    assert scorer.pair_judge()(prompts[:2], answers[:2], ["no idea", ""]) == [1.0, 1.0]
    assert scorer.pair_judge()(prompts[:1], answers[:1], answers[:1]) == [0.5]


def test_a_module_function_gets_message_dicts_and_returns_floats():
    prompts = World(seed=0).prompts(2, "eval")
    SEEN.clear()
    scorer = reward_function("test_scorers:length_reward")
    scores = scorer(prompts, ["abc", ""])
    assert scores == [3.0, 0.0] and all(type(s) is float for s in scores)
    assert SEEN[0][0] == [{"role": m.role, "content": m.content} for m in prompts[0].messages]
    with pytest.raises(RlhfkitError, match="no pairwise judge"):
        scorer.pair_judge()


def test_an_unknown_function_is_named_in_the_error():
    with pytest.raises(RlhfkitError, match="reward 'test_scorers:nope': cannot import nope from test_scorers"):
        reward_function("test_scorers:nope")
