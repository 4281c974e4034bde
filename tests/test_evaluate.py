"""`rlhfkit eval` end to end on the tiny model, and the sequence KL it reports."""

from __future__ import annotations

import json

import pytest
import torch

from rlhfkit.config import ModelConfig
from rlhfkit.data.tokenize import prompt_ids
from rlhfkit.data.world import World
from rlhfkit.errors import RlhfkitError
from rlhfkit.eval.evaluate import EvalConfig, evaluate, sequence_kl
from rlhfkit.models import load_model, save_model
from rlhfkit.generation import generate

PROMPTS = World(seed=0).prompts(8, "eval")


@pytest.fixture(scope="module")
def models(tiny_tokenizer):
    """The built-in tiny model (seed 0) and another random init of it (seed 1)."""
    return load_model(ModelConfig(), tiny_tokenizer, seed=0), load_model(ModelConfig(), tiny_tokenizer, seed=1)


@pytest.fixture(scope="module")
def other_tiny(models, tiny_tokenizer, tmp_path_factory):
    """The seed-1 tiny model saved as a model folder, to pass as `--against`."""
    folder = tmp_path_factory.mktemp("other") / "tiny-seed1"
    save_model(models[1], tiny_tokenizer, folder)
    return str(folder)


@pytest.fixture(scope="module")
def samples(models, tiny_tokenizer):
    return generate(models[0], tiny_tokenizer, [p.messages for p in PROMPTS], 12, temperature=1.0, batch_size=3,
                    generator_seed=0)


def test_sequence_kl_of_a_model_to_itself_is_zero(models, tiny_tokenizer, samples):
    kl = sequence_kl(models[0], models[0], tiny_tokenizer, [p.messages for p in PROMPTS], samples, batch_size=3)
    assert len(kl) == 8 and max(abs(x) for x in kl) < 1e-5


@torch.no_grad()
def test_sequence_kl_matches_one_unpadded_sequence_at_a_time(models, tiny_tokenizer, samples):
    """The batched, padded computation equals a plain loop: for each prompt, the summed
    log p - log q of its response tokens from one unpadded forward pass per model. Between two
    random inits, on the first model's own samples (temperature 1), the mean is positive."""
    policy, reference = models
    kl = sequence_kl(policy, reference, tiny_tokenizer, [p.messages for p in PROMPTS], samples, batch_size=3)
    for prompt, gen, value in zip(PROMPTS, samples, kl):
        ids = prompt_ids(tiny_tokenizer, prompt.messages)
        full = torch.tensor([ids + gen.token_ids])
        targets = full[0, len(ids):]
        logp = [torch.log_softmax(m(input_ids=full).logits[0, len(ids) - 1 : -1].float(), -1)
                .gather(-1, targets[:, None]).sum() for m in (policy, reference)]
        assert value == pytest.approx(float(logp[0] - logp[1]), abs=1e-4)
    assert sum(kl) / len(kl) > 0


def read(path) -> dict:
    return json.loads(path.read_text())


def test_eval_tiny_against_itself_is_a_tie_with_zero_kl(tmp_path):
    """The same model on both sides: identical greedy answers, so every pair ties under gold
    (50%, all ties, consistent in both orders), equal statistics, KL 0."""
    out = tmp_path / "eval.json"
    returned = evaluate(EvalConfig(model="tiny", against="tiny", n_prompts=8, max_new_tokens=12, out=str(out)))
    report = read(out)
    assert report == json.loads(json.dumps(returned))
    wr = report["win_rate"]
    assert (wr["win_rate"], wr["ties"], wr["position_consistency"], wr["low"], wr["high"]) == (0.5, 8, 1.0, 0.5, 0.5)
    assert set(wr["length_controlled"]) >= {"win_rate", "low", "high", "length_coef", "scale", "extrapolated"}
    assert report["sides"]["model"] == {**report["sides"]["against"]}
    assert set(report["sides"]["model"]) == {"name", "mean_tokens", "eos_fraction", "gold_score"}
    assert abs(report["kl"]["mean"]) < 1e-5 and "temperature 0.0" in report["kl"]["note"]
    assert len(report["records"]) == 8
    record = report["records"][0]
    assert set(record) >= {"prompt", "model_response", "against_response", "verdict_model_first",
                           "verdict_against_first", "preference", "model_gold", "against_gold", "kl"}
    assert not (tmp_path / "eval.json.tmp").exists()


def test_eval_against_a_different_model_and_against_the_reference(tmp_path, other_tiny):
    report = evaluate(EvalConfig(model="tiny", against=other_tiny, n_prompts=8, max_new_tokens=12, temperature=1.0,
                                 out=str(tmp_path / "a.json")))
    assert report["kl"]["mean"] > 0 and report["kl"]["note"] is None  # sampled at temperature 1: no caveat
    prefs = [r["preference"] for r in report["records"]]
    assert report["win_rate"]["win_rate"] == pytest.approx(sum(prefs) / 8)

    ref = evaluate(EvalConfig(model="tiny", n_prompts=8, max_new_tokens=12, out=str(tmp_path / "b.json")))
    world = World(seed=0)
    assert [r["against_response"] for r in ref["records"]] == [world.demonstrate(p) for p in PROMPTS]
    assert ref["sides"]["against"]["gold_score"] == 1.0 and ref["sides"]["against"]["eos_fraction"] is None
    assert ref["win_rate"]["win_rate"] < 0.2 and ref["kl"] is None  # gibberish loses to the demonstrator


def test_eval_with_a_reward_model_on_a_prompts_file(tmp_path, tiny_tokenizer):
    """A file of {prompt, completion} records: the completions are the reference answers; a tiny
    (untrained) reward model judges, and its accuracy on held-out world rankings is reported."""
    from rlhfkit.reward import build_reward_model

    rm_dir = tmp_path / "rm"
    build_reward_model("tiny", tiny_tokenizer).save_pretrained(rm_dir)
    tiny_tokenizer.save_pretrained(rm_dir)
    world = World(seed=0)
    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text("".join(json.dumps({"prompt": p.messages[0].content, "completion": world.demonstrate(p)}) + "\n"
                                    for p in PROMPTS[:4]))
    report = evaluate(EvalConfig(model="tiny", prompts=str(prompts_file), judge="rm", rm=str(rm_dir),
                                 comparisons="world", n_prompts=4, max_new_tokens=8, out=str(tmp_path / "e.json")))
    assert report["n"] == 4 and report["records"][0]["against_response"] == world.demonstrate(PROMPTS[0])
    assert "gold_score" not in report["sides"]["model"]
    accuracy = report["rm_accuracy"]
    assert accuracy["source"] == "world" and accuracy["pairs"] > 0 and 0 <= accuracy["gold_accuracy"] <= 1


@pytest.mark.parametrize("flags, message", [
    (dict(prompts="prompts.jsonl"), "--judge gold needs the built-in world"),
    (dict(judge="rm"), "--rm PATH"),
    (dict(judge="llm"), "--llm.base-url"),
    (dict(comparisons="world"), "--rm PATH"),
])
def test_eval_rejects_impossible_configs_before_loading_anything(flags, message):
    with pytest.raises(RlhfkitError, match=message):
        evaluate(EvalConfig(model="tiny", **flags))


def test_eval_against_reference_needs_reference_answers(tmp_path):
    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text(json.dumps({"prompt": "hello"}) + "\n")
    with pytest.raises(RlhfkitError, match="reference answer"):
        evaluate(EvalConfig(model="tiny", prompts=str(prompts_file), judge="rm", rm="unused", out=str(tmp_path / "x.json")))


def test_human_judge_posts_both_orders_then_reads_the_labellers_verdicts(tmp_path):
    """--judge human: the first run posts every pair in both orders to the labelling database and
    stops with instructions; once labellers have ranked them the rerun reads the verdicts. A
    labeller who always picks the model's answer gives 100%; one who always picks the answer
    shown first gives exactly 50% (the orders cancel); ties count half."""
    from rlhfkit.label.store import Store, Submission

    db = tmp_path / "labels.db"
    cfg = dict(model="tiny", judge="human", db=str(db), n_prompts=4, max_new_tokens=8)
    with pytest.raises(RlhfkitError, match=r"(?s)4 of 4 pairs .* need a human verdict.*label serve --db"):
        evaluate(EvalConfig(**cfg, out=str(tmp_path / "a.json")))
    reference = {World(seed=0).demonstrate(p) for p in PROMPTS[:4]}
    store = Store(str(db), labels_per_task=2)
    assert len(store.labels()) == 0

    def label_all(name: str, choose) -> None:
        who = store.authenticate(store.add_labeller(name)).labeller_id
        while (task := store.next_task(who)) is not None:
            store.submit(who, Submission(task.id, f"{name}-task-{task.id}", "rank", choose(task.responses), "", ""))

    label_all("fan", lambda r: (1, 0) if r[0] in reference else (0, 1))  # always the model's answer
    report = evaluate(EvalConfig(**cfg, out=str(tmp_path / "b.json")))
    assert report["win_rate"]["win_rate"] == 1.0
    label_all("lazy", lambda r: (0, 1))  # always the first position: averaged with "fan" per task
    report = evaluate(EvalConfig(**cfg, out=str(tmp_path / "c.json")))
    assert report["win_rate"]["win_rate"] == pytest.approx(0.75)
