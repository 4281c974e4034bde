"""The PPO stage on the tiny model: the analytic anchors at step 1 and a learning test."""

import json
from pathlib import Path

import pytest
import torch

from rlhfkit.cli import parse
from rlhfkit.errors import RlhfkitError
from rlhfkit.models import load_tokenizer
from rlhfkit.train import ppo, sft


def short_answer(prompts, responses):
    """A reward the tiny policy can visibly learn in seconds: 1 for answers of <= 2 characters."""
    return [1.0 if len(r.strip()) <= 2 else 0.0 for r in responses]


def one_reward(prompts, responses):
    return [1.0] * len(responses)


def no_reward(prompts, responses):
    return [0.0] * len(responses)


def ppo_rows(out: Path) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "ppo/score" in r]


@pytest.fixture(scope="module")
def tiny_sft(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ppo") / "sft"
    return sft.train(parse("sft", ["--recipe", "tiny", "--run.steps", "80", "--eval.gold-prompts", "0",
                                   "--eval.no-at-start", "--run.out", str(out)]))


def run_ppo(tiny_sft: Path, out: Path, *flags: str) -> list[dict]:
    args = ["--recipe", "tiny", "--model.name", str(tiny_sft), "--reward", "test_ppo:short_answer",
            "--eval.gold-prompts", "0", "--eval.no-at-start", "--run.out", str(out), *flags]
    return ppo_rows(ppo.train(parse("ppo", args)))


@pytest.mark.parametrize("variant", [[], ["--algo.kl-estimator", "k3"], ["--algo.whiten-rewards"],
                                     ["--model.lora"]], ids=["k1", "k3", "whiten", "lora"])
def test_first_step_has_zero_kl_and_unit_ratio(tiny_sft, tmp_path, variant):
    """Before any update the policy is the reference (KL exactly 0) and the first update's
    logprobs are the rollout's (ratio 1 on the first minibatch; its forward is shared, and a fresh
    no-grad forward gives the same numbers); with LoRA the reference is the policy with its
    adapters disabled, which is the same function while the adapters are zero."""
    first, second = run_ppo(tiny_sft, tmp_path / "ppo", "--run.steps", "2", *variant)
    assert first["ppo/kl"] == pytest.approx(0.0, abs=1e-6)
    assert first["ppo/ratio_first_minibatch"] == pytest.approx(1.0, abs=1e-6)
    assert second["ppo/ratio_first_minibatch"] == pytest.approx(1.0, abs=1e-6)
    assert first["ppo/first_forward_gap"] == 0.0 and "ppo/first_forward_gap" not in second
    assert 0 < first["ppo/eos_fraction"] <= 1 and first["ppo/response_tokens"] > 0


def test_ppo_raises_its_reward(tiny_sft, tmp_path):
    rows = run_ppo(tiny_sft, tmp_path / "ppo", "--run.steps", "20", "--optim.lr", "1e-4")
    first, last = [r["ppo/score"] for r in rows[:5]], [r["ppo/score"] for r in rows[-5:]]
    assert sum(last) / 5 > sum(first) / 5 + 0.15, (first, last)
    assert rows[-1]["ppo/kl"] > 0  # it moved away from the reference, and the penalty saw it


def assert_beats_sft(out: Path, margin: float) -> None:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/gold_score" in r]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 30
    assert evals[-1]["eval/gold_score"] > evals[0]["eval/gold_score"] + margin, evals
    final = evals[-1]
    assert final["eval/vs_sft_win_rate"] > 0.5 and final["eval/vs_sft_sampled_win_rate"] > 0.5, final


def test_gold_reward_raises_held_out_gold_score(imperfect_sft, tmp_path):
    """The gold judge as the reward (no reward model to exploit) must lift the held-out greedy
    gold score. Measured on this setup: 0.32 -> 0.41 after 30 steps."""
    out = tmp_path / "ppo"
    ppo.train(parse("ppo", ["--recipe", "tiny", "--model.name", str(imperfect_sft), "--reward", "gold",
                            "--optim.lr", "2e-4", "--run.steps", "30", "--eval.gold-prompts", "150", "--run.out", str(out)]))
    assert_beats_sft(out, margin=0.05)


def test_lora_reference_is_the_policy_with_adapters_disabled(tiny_sft, tmp_path):
    """Once LoRA training moves the adapters the policy leaves its reference, so the KL becomes
    positive (were the reference computed with adapters on, it would stay 0); the saved policy
    is merged and differs from the SFT weights."""
    rows = run_ppo(tiny_sft, tmp_path / "ppo", "--model.lora", "--run.steps", "6", "--optim.lr", "3e-3")
    assert rows[0]["ppo/kl"] == pytest.approx(0.0, abs=1e-6)
    assert max(r["ppo/kl"] for r in rows[1:]) > 0.01
    from safetensors.torch import load_file

    before, after = load_file(tiny_sft / "model.safetensors"), load_file(tmp_path / "ppo" / "model.safetensors")
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)


def test_ptx_loss_alone_teaches_the_demonstrations(tiny_sft, tmp_path):
    """With a zero reward and no KL penalty the PPO terms carry no signal, so PPO-ptx is plain SFT
    on world demonstrations: its loss must fall."""
    rows = run_ppo(tiny_sft, tmp_path / "ppo", "--reward", "test_ppo:no_reward", "--algo.kl-coef", "0",
                   "--algo.ptx-coef", "1.0", "--run.steps", "8", "--optim.lr", "2e-3")
    ptx = [r["ppo/ptx_loss"] for r in rows]
    assert ptx[0] > 0 and sum(ptx[-3:]) / 3 < sum(ptx[:3]) / 3 - 0.1, ptx


def test_ema_tracks_the_policy():
    """decay 0.75: after the weights jump from 0 to 1, the average moves a quarter of the way per
    update: 0.25, then 0.4375 (= 0.25 + 0.25 * 0.75)."""
    model = torch.nn.Linear(2, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    ema = ppo.EMA(model, decay=0.75)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model)
    assert torch.allclose(ema.shadow["weight"], torch.full((1, 2), 0.25))
    ema.update(model)
    assert torch.allclose(ema.shadow["weight"], torch.full((1, 2), 0.4375))
    restored = ppo.EMA(model, decay=0.75, saved=ema.tensors())
    assert torch.equal(restored.shadow["weight"], ema.shadow["weight"])
    assert torch.equal(ppo.EMA.averaged_copy(model, ema.tensors()).weight, ema.shadow["weight"])


def test_prompts_from_a_file(tiny_sft, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Say the number {i}."}) + "\n" for i in range(10)))
    rows = run_ppo(tiny_sft, tmp_path / "ppo", "--prompts", str(prompts), "--run.steps", "1",
                   "--algo.prompts-per-step", "8", "--algo.minibatch-size", "4")
    assert len(rows) == 1 and "ppo/gold_score" not in rows[0]


def test_value_model_with_another_tokenizer_is_refused(tiny_sft, tmp_path):
    import shutil

    shutil.copytree(tiny_sft, tmp_path / "other")  # a model folder whose tokenizer differs
    other = load_tokenizer(str(tiny_sft))
    other.add_special_tokens({"additional_special_tokens": ["<|other|>"]})
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(RlhfkitError, match="different tokenizer"):
        run_ppo(tiny_sft, tmp_path / "ppo", "--value-model", str(tmp_path / "other"), "--run.steps", "1")


@pytest.mark.parametrize("stored_mean", [3.0, None], ids=["rlhfkit-rm", "plain-rm"])
def test_value_model_from_a_reward_model_starts_on_the_normalised_scale(tiny_sft, tmp_path, tiny_tokenizer,
                                                                        stored_mean):
    """PPO optimises normalised scores (raw - stored mean), so the value model copied from the RM
    must predict raw - mean at every position, not raw. A reward model trained elsewhere (no
    stored mean) keeps its head too, with mean 0."""
    from rlhfkit.data.records import user
    from rlhfkit.data.tokenize import prompt_ids, response_ids
    from rlhfkit.logprobs import token_values
    from rlhfkit.records import join
    from rlhfkit.reward import MEAN_KEY, build_reward_model
    from rlhfkit.value import save_value_model, value_model

    rm = build_reward_model(str(tiny_sft), tiny_tokenizer, seed=3)
    if stored_mean is not None:
        setattr(rm.config, MEAN_KEY, stored_mean)
    rm.save_pretrained(tmp_path / "rm")
    tiny_tokenizer.save_pretrained(tmp_path / "rm")
    cfg = parse("ppo", ["--recipe", "tiny", "--model.name", str(tiny_sft), "--reward", str(tmp_path / "rm")])
    assert ppo.value_source(cfg) == cfg.reward  # the reward model folder
    value = value_model(ppo.value_source(cfg), cfg.model, tiny_tokenizer, cfg.run.seed)
    seqs = join([prompt_ids(tiny_tokenizer, user("What is 2+3?"))], [response_ids(tiny_tokenizer, "5")],
                tiny_tokenizer.pad_token_id)
    with torch.no_grad():
        expected = token_values(rm, seqs) - (stored_mean or 0.0)
        assert torch.allclose(token_values(value, seqs), expected, atol=1e-5)

    # Saved the way a PPO run saves it, then loaded back as a value model: the same values.
    save_value_model(value, tmp_path / "value_model")
    cfg = parse("ppo", ["--recipe", "tiny", "--model.name", str(tiny_sft), "--reward", "gold",
                        "--value-model", str(tmp_path / "value_model")])
    assert ppo.value_source(cfg) == cfg.value_model
    assert ppo.value_source(parse("ppo", ["--recipe", "tiny", "--model.name", str(tiny_sft), "--reward", "gold"])) == str(tiny_sft)
    again = value_model(ppo.value_source(cfg), cfg.model, tiny_tokenizer, cfg.run.seed)
    with torch.no_grad():
        assert torch.allclose(token_values(again, seqs), expected, atol=1e-5)


def test_a_finished_samples_reward_is_the_plain_rm_score_of_its_chat_template(tiny_sft, tmp_path, tiny_tokenizer,
                                                                            monkeypatch):
    """The reward a PPO rollout gives a finished sample is what a plain transformers load of the RM
    folder gives apply_chat_template(prompt + [sample]) (ending `<|im_end|>\\n`), minus the stored
    mean; where the decoded text tokenizes back to the sample's own tokens, that conversation is
    the prompt, the sample (ending `<|im_end|>`) and the template's newline."""
    from transformers import AutoModelForSequenceClassification

    from rlhfkit.data.records import messages_to_dicts
    from rlhfkit.data.tokenize import prompt_ids
    from rlhfkit.reward import MEAN_KEY, build_reward_model

    rm = build_reward_model(str(tiny_sft), tiny_tokenizer, seed=3)
    setattr(rm.config, MEAN_KEY, 0.25)
    rm.save_pretrained(tmp_path / "rm")
    tiny_tokenizer.save_pretrained(tmp_path / "rm")
    scored, rollouts = [], []
    from rlhfkit import generation

    real_reward_function, real_generate = ppo.reward_function, generation.generate

    def recording_reward_function(*args, **kwargs):
        fn = real_reward_function(*args, **kwargs)

        def score(prompts, texts):
            scored.append((prompts, texts, fn(prompts, texts)))
            return scored[-1][2]
        return score

    def recording_generate(*args, **kwargs):
        rollouts.append(real_generate(*args, **kwargs))
        return rollouts[-1]

    monkeypatch.setattr(ppo, "reward_function", recording_reward_function)
    monkeypatch.setattr(generation, "generate", recording_generate)  # what PPO's Sampler calls
    run_ppo(tiny_sft, tmp_path / "ppo", "--reward", str(tmp_path / "rm"), "--run.steps", "1")

    (prompts, texts, rewards), = scored
    gens, = rollouts
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    newline = tiny_tokenizer("\n", add_special_tokens=False)["input_ids"]
    finished = own_tokens = 0
    for prompt, gen, text, reward in zip(prompts, gens, texts, rewards):
        if not gen.finished:
            continue
        finished += 1
        chat = messages_to_dicts(prompt.messages) + [{"role": "assistant", "content": text}]
        ids = tiny_tokenizer.apply_chat_template(chat, tokenize=True)["input_ids"]
        with torch.no_grad():
            assert reward == pytest.approx(plain(torch.tensor([ids])).logits[0, 0].item() - 0.25, rel=1e-5, abs=1e-6)
        own_tokens += ids == prompt_ids(tiny_tokenizer, prompt.messages) + gen.token_ids + newline
    assert finished > 0 and own_tokens > 0, (finished, own_tokens)


def test_importance_weights_are_one_when_the_sampler_is_the_trainer(tiny_sft, tmp_path):
    """The built-in engine samples with the trainer's own probabilities: PPO's truncated
    importance weights (old logprobs over sampling logprobs) are all 1."""
    rows = run_ppo(tiny_sft, tmp_path / "ppo", "--run.steps", "2", "--model.precision", "fp32",
                   "--algo.temperature", "0.8", "--rollout.importance-cap", "2")
    assert [r["ppo/importance_weight"] for r in rows] == pytest.approx([1.0, 1.0], abs=1e-4)


def test_ptx_loss_is_the_same_however_the_minibatch_is_split(tiny_sft, tmp_path):
    """PPO-ptx's demonstrations are split across a minibatch's shards (processes x grad_accum),
    each shard's NLL divided by the whole batch's tokens: with the weights held still (lr 0) the
    logged PPO-ptx loss cannot depend on the split."""
    losses = []
    for accum in ("1", "2"):
        # fp32: under bf16 autocast another batch layout moves the NLL by ~1e-3, here by ~1e-7
        rows = run_ppo(tiny_sft, tmp_path / accum, "--run.steps", "1", "--optim.lr", "0", "--algo.ptx-coef", "0.5",
                       "--algo.grad-accum", accum, "--model.precision", "fp32")
        losses.append(rows[0]["ppo/ptx_loss"])
    assert losses[0] > 0 and losses[1] == pytest.approx(losses[0], rel=1e-5)


def test_a_zero_missing_eos_penalty_scores_cut_answers_zero_and_the_logged_beta_shaped_the_step(tiny_sft, tmp_path):
    """Answers cut at max_new_tokens get the penalty as their score, and 0 means a score of 0 (it
    used to switch the penalty off, so the reward model's score of the cut text counted). With an
    adaptive KL target the coefficient changes after each step: the one logged is the one in that
    step's rewards (it used to be the next one)."""
    first, second = run_ppo(tiny_sft, tmp_path / "ppo", "--run.steps", "2", "--algo.max-new-tokens", "2",
                            "--reward", "test_ppo:one_reward", "--algo.missing-eos-penalty", "0",
                            "--algo.kl-target", "1.0", "--algo.kl-coef", "0.05")
    assert first["ppo/score"] == 1.0 and first["ppo/eos_fraction"] < 1.0  # some answers cut at 2 tokens
    # finished answers keep their 1, cut ones score 0; KL is 0 before any update
    assert first["ppo/reward"] == pytest.approx(first["ppo/eos_fraction"], abs=1e-6)
    assert first["ppo/kl_coef"] == 0.05 and second["ppo/kl_coef"] != 0.05
