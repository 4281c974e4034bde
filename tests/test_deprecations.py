"""rlhfkit's model paths call no API that transformers, PEFT or accelerate deprecate: their
warnings land in the middle of the progress bars (`past_key_values ... removed in 5.40.0`,
`is_gradient_checkpointing`), and the API goes away in a later release."""

import contextlib
import itertools
import logging
import sys
import warnings

import pytest
import torch

from rlhfkit.config import ModelConfig
from rlhfkit.data.records import user
from rlhfkit.data.tokenize import Example, prompt_ids
from rlhfkit.models import apply_lora, build_tiny_model, disable_dropout, load_model, load_tokenizer, save_model
from rlhfkit.logprobs import demonstration_nll, logprobs, rewards
from rlhfkit.records import join
from rlhfkit.reward import build_reward_model
from rlhfkit.engines import SamplingParams
from rlhfkit.engines.builtin import BuiltinEngine
from rlhfkit.generation import generate

LIBRARIES = ("transformers", "peft", "accelerate")


@contextlib.contextmanager
def no_library_deprecations():
    """Fail when the block makes transformers, PEFT or accelerate warn of a deprecation: a
    DeprecationWarning/FutureWarning that one of their modules raised (kept by the warning filters,
    so a warning silenced at its call site on purpose does not count), or a deprecation notice on
    transformers' logger (its `warning_once`, reset here so an earlier test cannot hide one).

    By the module that called ``warnings.warn``, not the one a warning is attributed to:
    transformers' deprecated-argument warnings point at torch's ``Module.__call__``. Other
    packages' warnings pass, so an unrelated deprecation elsewhere cannot make this flaky."""
    import transformers.utils.logging as hf_logging

    origins: dict[str, str] = {}
    original_warn = warnings.warn

    def warn(message, category=None, stacklevel=1, *args, **kwargs):
        origins[str(message)] = sys._getframe(1).f_globals.get("__name__", "")
        return original_warn(message, category, stacklevel + 1, *args, **kwargs)

    notices: list[str] = []

    class Notices(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "deprecat" in record.getMessage().lower():
                notices.append(f"{record.name}: {record.getMessage()}")

    handler, verbosity = Notices(), hf_logging.get_verbosity()
    hf_logging.warning_once.cache_clear()
    hf_logging.set_verbosity_warning()
    logging.getLogger("transformers").addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            warnings.warn = warn
            try:
                yield
            finally:
                warnings.warn = original_warn
    finally:
        logging.getLogger("transformers").removeHandler(handler)
        hf_logging.set_verbosity(verbosity)
    deprecations = [f"{origins.get(str(w.message), '?')}: {w.category.__name__}: {w.message}" for w in caught
                    if issubclass(w.category, (DeprecationWarning, FutureWarning))
                    and origins.get(str(w.message), "").split(".")[0] in LIBRARIES]
    assert not deprecations + notices, "\n".join(deprecations + notices)


@pytest.fixture
def tiny(tiny_tokenizer):
    model = build_tiny_model(tiny_tokenizer)
    disable_dropout(model)
    return model.eval(), tiny_tokenizer


PROMPTS = ["What is 2+2?", "Name a colour, please.", "Write a haiku about the sea."] * 2


@pytest.mark.parametrize("fast_steps", [False, True], ids=["model-forward", "decode-step"])
def test_decoding_with_a_kv_cache(tiny, fast_steps):
    """The built-in engine: the shared-prefix cache, prefills, refills and steps (greedy and sampled)."""
    model, tok = tiny
    prompts = [prompt_ids(tok, user(q)) for q in PROMPTS]
    engine = BuiltinEngine(model, tok.pad_token_id, batch_size=4, fast_steps=fast_steps)
    with no_library_deprecations():
        for temperature in (0.0, 1.0):
            outputs = engine.generate(prompts, SamplingParams(12, temperature, (tok.eos_token_id,)))
    assert all(o.token_ids for o in outputs)


def test_generate_serve_engine_and_hf_generate(tiny):
    """generation.generate (sdpa switch, progress bar) and the token stream `rlhfkit serve` and
    `rlhfkit chat` answer from."""
    from rlhfkit.serve.api import Engine, Params

    model, tok = tiny
    engine = Engine(model, tok)
    ids = torch.tensor([prompt_ids(tok, user(PROMPTS[0]))])
    try:
        with no_library_deprecations():
            generate(model, tok, [user(q) for q in PROMPTS], 8, temperature=1.0, batch_size=4, generator_seed=0)
            tokens = list(itertools.islice(engine.tokens(ids[0].tolist(), Params(6, 1.0, 0.9, (), 0),
                                                         torch.Generator().manual_seed(0)), 6))
    finally:
        engine.worker.shutdown()
    assert len(tokens) == 6


def test_training_forward_backward_packed_and_padded(tiny):
    """SFT's teacher-forced loss (packed where exact), a padded forward, and the reward model's
    packed scores, each with a backward pass."""
    model, tok = tiny
    model.train()
    examples = [Example(prompt_ids(tok, user(q)), tok(" four", add_special_tokens=False)["input_ids"]) for q in PROMPTS]
    with no_library_deprecations():
        nll, _ = demonstration_nll(model, examples, tok.pad_token_id)
        nll.backward()
        seqs = join([e.prompt for e in examples], [e.response for e in examples], tok.pad_token_id)
        model(input_ids=seqs.input_ids, attention_mask=seqs.attention_mask, position_ids=seqs.position_ids,
              labels=seqs.input_ids).loss.backward()
        rm = build_reward_model("tiny", tok)
        rewards(rm, [e.prompt + e.response for e in examples], tok.pad_token_id).sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_lora_train_save_and_load(tiny, tmp_path):
    """LoRA: adapters added (PEFT), a forward/backward, saved merged with its adapter, loaded back."""
    model, tok = tiny
    with no_library_deprecations():
        lora = apply_lora(model, ModelConfig(name="tiny", lora=True))
        lora.train()
        seqs = join([prompt_ids(tok, user(q)) for q in PROMPTS], [[5, 6, 7]] * len(PROMPTS), tok.pad_token_id)
        logprobs(lora, seqs).sum().backward()
        save_model(lora, tok, tmp_path / "m")
        loaded = load_model(ModelConfig(name=str(tmp_path / "m")), load_tokenizer(str(tmp_path / "m")))
    assert type(loaded).__name__ == "LlamaForCausalLM"
