"""The lean decoding step gives the model's own logits, bit for bit, and the decoding loop the
same tokens with it as without it."""

import contextlib
import copy

import pytest
import torch

from rlhfkit.data.records import user
from rlhfkit.data.tokenize import prompt_ids
from rlhfkit.fast.decode_step import HEADROOM, DecodeStep, packs_weights
from rlhfkit.models import build_tiny_model


def tiny(arch: str, vocab: int = 300, **overrides):
    """A randomly initialised 3-layer model of one architecture; grouped-query attention (4 query
    heads, 2 key/value heads) unless the architecture name says otherwise."""
    from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                              Qwen2ForCausalLM)

    classes = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
               "mistral": (MistralConfig, MistralForCausalLM)}
    config_class, model_class = classes[arch]
    settings = dict(vocab_size=vocab, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0,
                    tie_word_embeddings=arch == "llama")
    if arch == "mistral":
        settings["sliding_window"] = None
    settings.update(overrides)
    torch.manual_seed(0)
    model = model_class(config_class(**settings)).eval()
    model.config._attn_implementation = "sdpa"
    return model


def prefill(model, rows: int, width: int, padded: bool):
    torch.manual_seed(1)
    ids = torch.randint(3, model.config.vocab_size, (rows, width))
    mask = torch.ones(rows, width, dtype=torch.long)
    if padded:
        for row in range(rows):
            mask[row, : (row * 3) % width] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True).cache
    return cache, mask, positions[:, -1] + 1


ARCHS = ["llama", "qwen2", "mistral"]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("padded", [True, False])
def test_steps_give_the_models_logits_bit_for_bit(arch, precision, padded):
    """The prompts' forward with the step's cast weights gives the model's cache exactly. Then many
    steps (past the cache buffers' headroom, so they are reallocated), with rows leaving midway
    (the loop replaces the cache; the step copies it into new buffers): every step's logits equal
    the model's forward exactly, and the cache holds what the model's cache holds, rounded as
    attention rounds it. Qwen2 has q/k/v biases; the next test checks the tour's tiny Llama, whose
    attention is multi-head (no key/value sharing)."""
    model = tiny(arch)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        step = DecodeStep.build(model, rows=5)
        assert step is not None
        assert step.head.packed == (precision == "bf16" and packs_weights(torch.device("cpu"), torch.bfloat16))
        theirs, mask, positions = prefill(model, rows=5, width=9, padded=padded)
        with step.model_uses_cast_weights():  # the prompts' forward with the step's weights: the same cache
            ours, _, _ = prefill(model, rows=5, width=9, padded=padded)
        for a, b in zip(ours.layers, theirs.layers):
            assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
        assert "forward" not in vars(model.model.layers[0].self_attn.q_proj)  # the model's own forward is back
        torch.manual_seed(2)
        for index in range(HEADROOM + 8):
            if index == 10:  # two rows finish: both caches drop them
                keep = torch.tensor([0, 2, 4])
                theirs.batch_select_indices(keep)
                ours.batch_select_indices(keep)
                mask, positions = mask[keep], positions[keep]
            tokens = torch.randint(3, model.config.vocab_size, (len(mask),))
            mask = torch.cat([mask, mask.new_ones(len(mask), 1)], 1)
            expected = model(input_ids=tokens[:, None], attention_mask=mask, position_ids=positions[:, None],
                             cache=theirs, use_cache=True, logits_to_keep=1).logits[:, -1]
            got = step(tokens, positions, mask, ours)
            assert torch.equal(got, expected), f"step {index}: max |diff| {(got - expected).abs().max()}"
            positions = positions + 1
        for a, b in zip(ours.layers, theirs.layers):
            assert torch.equal(a.keys, b.keys.to(step.dtype)) and torch.equal(a.values, b.values.to(step.dtype))


def test_multi_head_attention_steps_are_exact_too(tiny_tokenizer):
    model = build_tiny_model(tiny_tokenizer).eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        step = DecodeStep.build(model)
        theirs, mask, positions = prefill(model, rows=3, width=6, padded=True)
        ours = copy.deepcopy(theirs)
        for _ in range(5):
            tokens = torch.randint(3, 200, (3,))
            mask = torch.cat([mask, mask.new_ones(3, 1)], 1)
            expected = model(input_ids=tokens[:, None], attention_mask=mask, position_ids=positions[:, None],
                             cache=theirs, use_cache=True, logits_to_keep=1).logits[:, -1]
            assert torch.equal(step(tokens, positions, mask, ours), expected)
            positions = positions + 1


def test_models_it_cannot_reproduce_keep_their_own_forward(tiny_tokenizer):
    """Anything but plain linear layers of a known architecture with full attention: no step."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    assert DecodeStep.build(tiny("llama")) is not None
    lora = get_peft_model(build_tiny_model(tiny_tokenizer), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert DecodeStep.build(lora) is None  # LoRA layers in place of nn.Linear
    assert DecodeStep.build(GPT2LMHeadModel(GPT2Config(vocab_size=100, n_embd=32, n_layer=1, n_head=2))) is None
    assert DecodeStep.build(tiny("mistral", sliding_window=8)) is None


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_decoding_gives_the_same_tokens_with_the_step_as_without(tiny_tokenizer, temperature):
    """The whole loop in bf16, two slots for six prompts (rows leave and join, caches are merged
    and cut): the same tokens, greedy and sampled, with the lean step as with the model's forward."""
    from rlhfkit.engines import SamplingParams
    from rlhfkit.engines.builtin import BuiltinEngine

    model = build_tiny_model(tiny_tokenizer).eval()
    prompts = [prompt_ids(tiny_tokenizer, user(t)) for t in ("hi", "What is 12 + 30?", "ok", "Why?",
                                                             "Name the capital of France, please.", "Tell me more.")]
    pad = tiny_tokenizer.pad_token_id

    def run(stop, fast):
        torch.manual_seed(0)
        engine = BuiltinEngine(model, pad, "bf16", batch_size=2, fast_steps=fast)
        return [o.token_ids for o in engine.generate(prompts, SamplingParams(12, temperature, tuple(stop)))]

    # A stop token that the rows reach first at the most different steps, in a run that never stops.
    free = run([-1], fast=False)
    stop = [max({t for row in free for t in row}, key=lambda t: len({row.index(t) for row in free if t in row}))]
    runs = [run(stop, fast) for fast in (True, False)]
    assert runs[0] == runs[1]
    assert len({len(row) for row in runs[0]}) > 1  # rows really finish at different steps


def test_the_model_computes_with_the_steps_cast_weights_to_the_same_numbers(tiny_tokenizer):
    """The prompts' forward (and serving's, whose weights are cast once) runs the model with the
    step's cast weights: HF generate gives the same tokens and logits within the context, and the
    model's own forwards are back after it."""
    model = build_tiny_model(tiny_tokenizer).eval()
    ids = torch.tensor([prompt_ids(tiny_tokenizer, user("What is 12 + 30?"))])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast_weights = DecodeStep.build(model, rows=1).model_uses_cast_weights
    outputs = []
    for context in (cast_weights, contextlib.nullcontext):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), context():
            outputs.append(model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                                          do_sample=False, output_logits=True, return_dict_in_generate=True,
                                          pad_token_id=tiny_tokenizer.pad_token_id))
    assert torch.equal(outputs[0].sequences, outputs[1].sequences)
    assert all(torch.equal(a, b) for a, b in zip(outputs[0].logits, outputs[1].logits))
    assert "forward" not in vars(model.lm_head)


def test_cpus_whose_onednn_refuses_to_pack_bf16_decode_with_plain_cast_weights(monkeypatch):
    """oneDNN refuses to pack bf16 weights without avx_ne_convert or AVX-512 (AVX2-only CPUs such
    as Zen 3 raise "bf16 path needs the cpu support ..."): there the step must still build, with
    unpacked weights, and give the model's logits exactly."""
    import rlhfkit.fast.decode_step as decode_step

    def refuse(weight, rows):
        raise RuntimeError("mkldnn_reorder_linear_weight: bf16 path needs the cpu support avx_ne_convert")

    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", refuse)
    decode_step._onednn_packs_bf16.cache_clear()
    try:
        assert not packs_weights(torch.device("cpu"), torch.bfloat16)
        model = tiny("llama")
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            step = DecodeStep.build(model, rows=2)
            assert step is not None and not step.head.packed
            cache, mask, positions = prefill(model, rows=2, width=5, padded=True)
            theirs = copy.deepcopy(cache)
            tokens = torch.tensor([5, 7])
            mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
            expected = model(input_ids=tokens[:, None], attention_mask=mask, position_ids=positions[:, None],
                             cache=theirs, use_cache=True, logits_to_keep=1).logits[:, -1]
            assert torch.equal(step(tokens, positions, mask, cache), expected)
    finally:
        monkeypatch.undo()
        decode_step._onednn_packs_bf16.cache_clear()
