"""The reward-model stage on the tiny model: learning, normalisation, loading, scoring, data paths."""

import json
import math
from pathlib import Path

import pytest
from transformers import AutoModelForSequenceClassification

from rlhfkit.cli import main, parse
from rlhfkit.data.world import World
from rlhfkit.rankings import sample_world_rankings
from rlhfkit.reward import RewardModel
from rlhfkit.stats import gold_agreement, spearman_rho
from rlhfkit.train import rm

HH = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "hh-rlhf"


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def tiny_rm(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("rm") / "rm"
    # The random tiny backbone on the world's synthetic candidates (no sampling): the RM stage alone.
    return rm.train(parse("rm", ["--recipe", "tiny", "--model.name", "tiny", "--data.responses", "candidates",
                                 "--data.world-prompts", "800", "--data.world-eval-prompts", "150", "--run.steps", "100",
                                 "--run.out", str(out)]))


@pytest.fixture(scope="module")
def few_step_rm(tmp_path_factory) -> Path:
    """A few steps of the RM stage: the layout tests need a trained, saved head, not a good one."""
    out = tmp_path_factory.mktemp("rm") / "rm"
    return rm.train(parse("rm", ["--recipe", "tiny", "--model.name", "tiny", "--data.responses", "candidates",
                                 "--data.world-prompts", "32", "--data.world-eval-prompts", "8", "--run.steps", "5",
                                 "--norm-examples", "32", "--run.out", str(out)]))


def test_tiny_rm_orders_held_out_responses_like_the_gold_judge(tiny_rm):
    start, end = rows(tiny_rm)[0], rows(tiny_rm)[-1]
    assert start["eval/gold_accuracy"] < 0.65  # an untrained head is near chance
    assert end["eval/gold_accuracy"] >= 0.80, end
    assert end["eval/gold_spearman"] > 0.6
    assert end["eval/accuracy"] > start["eval/accuracy"] and end["eval/loss"] < start["eval/loss"]
    assert end["eval/accuracy_k4"] == end["eval/accuracy"]  # every world prompt has K = 4


def test_rm_loads_as_sequence_classifier_and_demonstrations_score_mean_zero(tiny_rm):
    plain = AutoModelForSequenceClassification.from_pretrained(tiny_rm)
    assert plain.config.num_labels == 1
    model = RewardModel.load(tiny_rm)
    demos = World(seed=0).demonstrations(256, "train")  # the normalisation set
    scores = model.score([d.prompt for d in demos], [d.response for d in demos])
    assert abs(sum(scores) / len(scores)) < 1e-3
    raw = model.score([d.prompt for d in demos[:4]], [d.response for d in demos[:4]], normalized=False)
    assert raw[0] - scores[0] == pytest.approx(model.mean, abs=1e-5)


def test_rm_scores_like_a_plain_transformers_load_of_the_chat_template(few_step_rm):
    """The TRL way of scoring: AutoModelForSequenceClassification on
    apply_chat_template(prompt + [assistant]), one sequence at a time and as a right-padded batch,
    gives RewardModel.score's raw scores (ChatML ends `<|im_end|>\\n`: the head reads the newline
    in both). Multi-turn and plain-text prompts included."""
    import random

    import torch
    from transformers import AutoTokenizer

    from rlhfkit.data.records import Message, messages_to_dicts, user
    from rlhfkit.logprobs import rewards
    from rlhfkit.reward import encode

    world = World(seed=3)
    prompts, responses = [], []
    for i, prompt in enumerate(world.prompts(4, "eval")):
        for text in world.candidates(prompt, 2, random.Random(i)):
            prompts.append(prompt.messages)
            responses.append(text)
    multi_turn = (Message("system", "Be brief."), Message("user", "What is 2 + 2?"), Message("assistant", "4"),
                  Message("user", "And 3 + 3?"))
    prompts += [multi_turn, multi_turn, user("What is 2 + 2?")]
    responses += ["6", "The answer is 6, my friend!", "4"]

    rm = RewardModel.load(few_step_rm)
    raw = rm.score(prompts, responses, normalized=False)
    tok = AutoTokenizer.from_pretrained(few_step_rm)
    plain = AutoModelForSequenceClassification.from_pretrained(few_step_rm).eval()
    chats = [messages_to_dicts(p) + [{"role": "assistant", "content": r}] for p, r in zip(prompts, responses)]
    with torch.no_grad():
        one_by_one = [plain(**tok.apply_chat_template(c, tokenize=True, return_dict=True, return_tensors="pt"))
                      .logits[0, 0].item() for c in chats]
        tok.padding_side = "right"
        batch = tok.apply_chat_template(chats, tokenize=True, padding=True, return_dict=True, return_tensors="pt")
        assert (batch["attention_mask"] == 0).any()  # the batch really is padded
        batched = plain(**batch).logits[:, 0].tolist()
    assert raw == pytest.approx(one_by_one, rel=1e-5, abs=1e-6)
    assert raw == pytest.approx(batched, rel=1e-5, abs=1e-6)
    assert rm.score(prompts, responses) == pytest.approx([r - rm.mean for r in raw], abs=1e-6)

    # the very token ids, and the packed and padded scoring paths agree on them
    seqs = [encode(rm.tokenizer, p, r, rm.max_len, False) for p, r in zip(prompts, responses)]
    assert seqs == [tok.apply_chat_template(c, tokenize=True)["input_ids"] for c in chats]
    with torch.no_grad():
        packed = rewards(rm.model, seqs, tok.pad_token_id, fast=True)
        assert rm.model.__dict__["_rlhfkit_packs_exactly"] == {"rewards": True}  # the packed path really ran
        assert torch.allclose(packed, rewards(rm.model, seqs, tok.pad_token_id, fast=False), atol=1e-5)


def test_rm_folder_has_a_model_card_whose_example_gives_the_scores(few_step_rm):
    """README.md in the RM folder: its 5-line transformers example, run as written, gives
    RewardModel.score's raw and normalised scores, and it names the stored mean."""
    import re

    card = (few_step_rm / "README.md").read_text()
    assert "rlhfkit_reward_mean" in card and "apply_chat_template" in card
    code = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    assert len(code.strip().splitlines()) == 5
    names = {"FOLDER": str(few_step_rm)}
    exec(code, names)
    rm = RewardModel.load(few_step_rm)
    assert names["raw"] == pytest.approx(rm.score(["What is 2 + 2?"], ["4"], normalized=False)[0], rel=1e-5)
    assert names["normalised"] == pytest.approx(rm.score(["What is 2 + 2?"], ["4"])[0], rel=1e-5, abs=1e-6)


def test_rm_ranks_gold_better_responses_higher_on_fresh_prompts(tiny_rm):
    """Prompts from a world with another seed (never seen in training or in the eval split),
    4 candidates each, scored through the public API: RM order vs gold order."""
    import random

    model = RewardModel.load(tiny_rm)
    world = World(seed=7)
    rhos, agree, pairs = [], 0, 0
    for i, prompt in enumerate(world.prompts(60, "eval")):
        texts = world.candidates(prompt, 4, random.Random(i))
        scores = model.score([prompt.messages] * len(texts), texts)
        gold = [s.score for s in world.judge_many([prompt] * len(texts), texts)]
        a, n = gold_agreement(scores, gold)
        agree, pairs = agree + a, pairs + n
        rho = spearman_rho(scores, gold)
        if rho is not None:
            rhos.append(rho)
    assert agree / pairs > 0.75
    assert sum(rhos) / len(rhos) > 0.5


def test_rm_score_command_writes_rewards(tiny_rm, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"prompt": "What is 2 + 2? Answer with just the number.", "response": "4"}) + "\n"
                   + json.dumps({"prompt": [{"role": "user", "content": "hi"}], "response": "hello"}) + "\n")
    main(["rm", "score", "--model", str(tiny_rm), "--input", str(src), "--out", str(tmp_path / "out.jsonl")])
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [o["response"] for o in out] == ["4", "hello"] and all(math.isfinite(o["reward"]) for o in out)


def test_rm_score_names_the_bad_field(tiny_rm, tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"prompt": "x", "response": 3}) + "\n")
    with pytest.raises(SystemExit):
        main(["rm", "score", "--model", str(tiny_rm), "--input", str(src), "--out", str(tmp_path / "o.jsonl")])
    assert "line 1: field 'response'" in capsys.readouterr().err


def test_gold_agreement_and_spearman_by_hand():
    assert gold_agreement([3.0, 2.0, 1.0], [1.0, 0.5, 0.5]) == (2, 2)  # the tied gold pair is not counted
    assert spearman_rho([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert spearman_rho([1, 2, 3], [30, 20, 10]) == pytest.approx(-1.0)
    assert spearman_rho([1, 2, 3, 4], [1, 1, 2, 2]) == pytest.approx(0.894427, abs=1e-5)
    assert spearman_rho([1, 1], [0, 1]) is None


def test_rm_on_policy_samples_from_a_causal_lm(tmp_path):
    """The world path that samples K completions from a policy and labels them."""
    args = ["--recipe", "tiny", "--model.name", "tiny", "--data.responses", "policy", "--data.world-prompts", "12",
            "--data.world-eval-prompts", "6", "--data.k", "3", "--data.max-new-tokens", "8",
            "--run.steps", "2", "--run.out", str(tmp_path / "rm")]
    out = rm.train(parse("rm", args))
    cached = [json.loads(l) for l in (out / "data" / "train_rankings.jsonl").read_text().splitlines()]
    assert len(cached) == 12 and all(len(r["completions"]) == 3 for r in cached)
    assert "eval/accuracy_k3" in rows(out)[-1]


def test_mixed_rankings_hold_policy_samples_then_world_candidates():
    """`mixed`: per prompt, K - K//2 policy samples followed by K//2 synthetic candidates, all
    ranked together by one labeler draw."""
    import random

    from rlhfkit.config import ModelConfig

    data = parse("rm", ["--recipe", "tiny", "--data.responses", "mixed", "--data.k", "4",
                        "--data.max-new-tokens", "6"]).data
    rankings = sample_world_rankings(data, ModelConfig(name="tiny"), "train", 5, seed=0)
    world = World(seed=data.world_seed)
    for i, (prompt, ranking) in enumerate(zip(world.prompts(5, "train"), rankings)):
        assert len(ranking.completions) == 4 and sorted(set(ranking.ranks)) == list(range(len(set(ranking.completions))))
        assert list(ranking.completions[2:]) == world.candidates(prompt, 2, random.Random(f"0:train:{i}"))


def test_rm_with_an_encoder_backbone(tmp_path):
    """A BERT-style backbone scores the decoded conversation with its own tokenizer."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *"abcdefghijklmnopqrstuvwxyz0123456789:-,.?!'"])}
    core = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    core.normalizer = normalizers.BertNormalizer(lowercase=True)
    core.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    core.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]")
    bert = BertForSequenceClassification(BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1,
                                                    num_attention_heads=2, intermediate_size=64, num_labels=1))
    bert.save_pretrained(tmp_path / "bert")
    tok.save_pretrained(tmp_path / "bert")
    args = ["--recipe", "tiny", "--model.name", str(tmp_path / "bert"), "--data.responses", "candidates", "--data.world-prompts", "16",
            "--data.world-eval-prompts", "8", "--run.steps", "3", "--run.out", str(tmp_path / "rm")]
    out = rm.train(parse("rm", args))
    scores = RewardModel.load(out).score(["What is 2 + 2?"], ["4"])
    assert len(scores) == 1 and math.isfinite(scores[0])


@pytest.mark.skipif(not HH.exists(), reason=f"hh-rlhf data not found at {HH}; the real-data RM check needs it")
def test_rm_reads_hh_rlhf_comparisons(tmp_path):
    args = ["--recipe", "tiny", "--model.name", "tiny", "--data.train", str(HH / "helpful-base.jsonl.gz"), "--data.skip-bad",
            "--data.max-examples", "24", "--run.steps", "2", "--batch.micro-batch-size", "4",
            "--run.out", str(tmp_path / "rm")]
    out = rm.train(parse("rm", args))
    end = rows(out)[-1]
    assert "eval/accuracy_k2" in end and "eval/gold_accuracy" not in end  # human labels, no gold judge
