"""Generation and teacher-forced scoring of responses on the tiny model."""

import pytest
import torch

from rlhfkit.data.records import user
from rlhfkit.data.tokenize import end_of_turn_id, prompt_ids
from rlhfkit.models import build_tiny_model
from rlhfkit.logprobs import logprobs, response_logits
from rlhfkit.records import join
from rlhfkit.generation import generate


def test_generation_stops_at_end_of_turn_and_marks_unfinished(tiny_tokenizer):
    model = build_tiny_model(tiny_tokenizer)
    gens = generate(model, tiny_tokenizer, [user("hi"), user("What is 2 + 2?")], max_new_tokens=6,
                    temperature=1.0, generator_seed=0)
    eot = end_of_turn_id(tiny_tokenizer)
    for g in gens:
        assert g.finished == (g.token_ids[-1] == eot) and eot not in g.token_ids[:-1]
        assert len(g.token_ids) <= 6
    again = generate(model, tiny_tokenizer, [user("hi"), user("What is 2 + 2?")], max_new_tokens=6,
                     temperature=1.0, generator_seed=0)
    assert [g.token_ids for g in gens] == [g.token_ids for g in again]  # seeded sampling is reproducible


def tiny_gpt2(tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=64, n_layer=2, n_head=2,
                                      pad_token_id=tokenizer.pad_token_id))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_batched_logprobs_equal_unpadded_one_at_a_time(tiny_tokenizer, arch):
    """Left-padded prompts + right-padded responses, with position ids from the mask, give the
    same response logprobs as each sequence alone (and 0 on padding). GPT-2's absolute positions
    catch wrong position ids; Llama's rotary ones are shift-invariant."""
    torch.manual_seed(0)
    model = (build_tiny_model(tiny_tokenizer) if arch == "llama" else tiny_gpt2(tiny_tokenizer)).eval()
    prompts = [prompt_ids(tiny_tokenizer, user(t)) for t in ("hi", "What is 12 + 30? Answer with just the number.")]
    responses = [[70, 71, 72, 73, end_of_turn_id(tiny_tokenizer)], [80, 81]]
    with torch.no_grad():
        batched = logprobs(model, join(prompts, responses, tiny_tokenizer.pad_token_id), temperature=0.7)
        for i in range(2):
            alone = logprobs(model, join([prompts[i]], [responses[i]], tiny_tokenizer.pad_token_id), 0.7)
            n = len(responses[i])
            assert torch.allclose(batched[i, :n], alone[0, :n], atol=1e-5)
            assert (batched[i, n:] == 0).all()
    # the temperature is applied: T=0.7 logprobs differ from T=1 ones
    with torch.no_grad():
        t1 = logprobs(model, join(prompts, responses, tiny_tokenizer.pad_token_id), temperature=1.0)
    assert not torch.allclose(t1, batched)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "lora"])
def test_response_logits_equal_the_full_forward_sliced(tiny_tokenizer, arch):
    """Only the response positions go through the LM head; they must be exactly the positions
    P-1 .. P+R-2 of a full forward pass (an off-by-one would score each token with the logits
    of its neighbour)."""
    torch.manual_seed(0)
    model = tiny_gpt2(tiny_tokenizer) if arch == "gpt2" else build_tiny_model(tiny_tokenizer)
    if arch == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model.eval()
    prompts = [prompt_ids(tiny_tokenizer, user(t)) for t in ("hi", "What is 12 + 30? Answer with just the number.")]
    seqs = join(prompts, [[70, 71, 72, end_of_turn_id(tiny_tokenizer)], [80]], tiny_tokenizer.pad_token_id)
    with torch.no_grad():
        full = model(input_ids=seqs.input_ids, attention_mask=seqs.attention_mask,
                     position_ids=seqs.position_ids).logits
        kept = response_logits(model, seqs)
    assert kept.shape == (2, 4, full.shape[-1])
    torch.testing.assert_close(kept, full[:, seqs.prompt_width - 1 : -1])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("prunable", [True, False])
def test_decoding_loop_matches_transformers_generate(tiny_tokenizer, arch, prunable, monkeypatch):
    """Our loop gives the greedy tokens of HF generate for prompts of different lengths that stop
    at different steps: all in one batch (finished rows leave it), two rows at a time (waiting
    prompts join as rows finish, their cache left-padded to the batch's), and when the cache
    cannot drop rows (finished rows stay; nobody joins until the batch is done). The prompts'
    common prefix is computed once and copied to every row."""
    from transformers import cache_utils

    from rlhfkit.data.tokenize import left_pad, left_pad_after_common_prefix
    from rlhfkit.engines import SamplingParams
    from rlhfkit.engines.builtin import BuiltinEngine

    torch.manual_seed(0)
    model = (build_tiny_model(tiny_tokenizer) if arch == "llama" else tiny_gpt2(tiny_tokenizer)).eval()
    prompts = [user(t) for t in ("hi", "What is 12 + 30?", "Name the capital of France, please.", "ok", "Why?",
                                 "Tell me a story about a cat.")]
    pad = tiny_tokenizer.pad_token_id
    encoded = [prompt_ids(tiny_tokenizer, p) for p in prompts]
    ids, mask = left_pad(encoded, pad)

    def hf(stop):
        with torch.no_grad():
            return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False,
                                  eos_token_id=stop, pad_token_id=pad)[:, ids.shape[1]:]

    # A stop token that the greedy continuations reach at different steps (or never).
    free = hf([-1]).tolist()
    firsts = {}
    for row in free:
        for pos, token in enumerate(row):
            firsts.setdefault(token, set()).add(pos if pos == row.index(token) else None)
    stop = max(firsts, key=lambda tok: len({p for p in firsts[tok] if p is not None}))
    expected = [row[: row.index(stop) + 1] if stop in row else row for row in hf([stop]).tolist()]
    stopped_at = {len(row) for row in expected}
    assert len(stopped_at) > 1  # the rows really stop at different steps
    if not prunable:
        monkeypatch.delattr(cache_utils.Cache, "batch_select_indices")
        assert not hasattr(cache_utils.DynamicCache, "batch_select_indices")
    _, _, shared = left_pad_after_common_prefix(encoded, pad)
    assert shared == 4  # the chat template's common start: computed once, its cache copied
    for batch_size in (len(prompts), 2, 1):
        finished = []
        outputs = BuiltinEngine(model, pad, batch_size=batch_size).generate(
            encoded, SamplingParams(10, 0.0, (stop,)), on_finished=finished.append)
        assert [o.token_ids for o in outputs] == expected
        assert [o.finished for o in outputs] == [stop in row for row in expected]
        assert sum(finished) == len(prompts)
    assert [o.token_ids for o in BuiltinEngine(model, pad).generate(encoded, SamplingParams(0, 0.0, (stop,)))] \
        == [[]] * len(prompts)


def test_cpu_trains_with_eager_attention_and_decodes_with_sdpa(tiny_tokenizer, monkeypatch):
    """Eager attention for training forwards on CPU (faster backward), sdpa inside the decoding
    loop (faster there), the model's setting restored afterwards, and the two agree."""
    import rlhfkit.engines.builtin as builtin
    from rlhfkit.config import ModelConfig
    from rlhfkit.models import attention_implementation, load_model

    model = load_model(ModelConfig(name="tiny"), tiny_tokenizer).eval()
    assert model.config._attn_implementation == "eager"
    seen, real_steps = [], builtin._steps
    monkeypatch.setattr(builtin, "_steps", lambda m, *a, **k: seen.append(m.config._attn_implementation) or real_steps(m, *a, **k))
    generate(model, tiny_tokenizer, [user("hi")], max_new_tokens=3)
    assert seen == ["sdpa"] and model.config._attn_implementation == "eager"

    prompts = [prompt_ids(tiny_tokenizer, user(t)) for t in ("hi", "What is 12 + 30?")]
    seqs = join(prompts, [[70, 71, end_of_turn_id(tiny_tokenizer)], [80]], tiny_tokenizer.pad_token_id)
    with torch.no_grad():
        eager = logprobs(model, seqs)
        with attention_implementation(model, "sdpa"):
            sdpa = logprobs(model, seqs)
    torch.testing.assert_close(eager, sdpa, atol=1e-5, rtol=1e-5)


def test_minibatch_is_cut_to_its_own_widths_with_the_same_logprobs(tiny_tokenizer):
    """select() drops the columns no row of the minibatch uses (the batch's longest prompt and
    response may be elsewhere), and the kept logprobs are those of the whole batch."""
    from rlhfkit.records import select

    torch.manual_seed(0)
    model = build_tiny_model(tiny_tokenizer).eval()
    eot = end_of_turn_id(tiny_tokenizer)
    prompts = [prompt_ids(tiny_tokenizer, user(t)) for t in ("hi", "What is 12 + 30? Answer with just the number.", "ok")]
    seqs = join(prompts, [[70, eot], [80, 81, 82, 83, 84, eot], [90, 91, eot]], tiny_tokenizer.pad_token_id)
    rows = torch.tensor([2, 0])  # the short prompts and responses
    sub = select(seqs, rows)
    assert sub.input_ids.shape[1] == max(len(prompts[0]), len(prompts[2])) + 3
    assert sub.response_mask.shape[1] == 3 and sub.prompt_width == max(len(prompts[0]), len(prompts[2]))
    with torch.no_grad():
        whole = logprobs(model, seqs)
        part = logprobs(model, sub)
    torch.testing.assert_close(part, whole[rows, :3], atol=1e-5, rtol=1e-5)


def test_sample_tokens_follows_the_tempered_softmax():
    from rlhfkit.engines.builtin import sample_tokens

    torch.manual_seed(0)
    logits = torch.tensor([[0.0, 1.0, 2.0, -1e9]]).repeat(100_000, 1)
    counts = torch.bincount(sample_tokens(logits, temperature=2.0), minlength=4).float() / 100_000
    expected = torch.softmax(logits[0] / 2.0, -1)
    assert counts[3] == 0  # a zero-probability token is never drawn
    assert torch.allclose(counts, expected, atol=0.006), (counts, expected)  # ~4 standard errors


def test_top_p_keeps_the_smallest_likely_set():
    from rlhfkit.engines.builtin import sample_tokens

    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]]).repeat(4000, 1)  # probabilities .64, .24, .09, .03
    generator = torch.Generator().manual_seed(0)
    assert set(sample_tokens(logits, 1.0, 0.5, generator).tolist()) == {0}
    kept = sample_tokens(logits, 1.0, 0.8, generator)
    assert set(kept.tolist()) == {0, 1}  # .64 < .8, so the next most likely joins; then .88 >= .8
    assert abs(float((kept == 0).float().mean()) - 0.64 / 0.88) < 0.03  # renormalised over the kept set
    first, second = (sample_tokens(logits, 1.0, 0.8, torch.Generator().manual_seed(7)) for _ in range(2))
    assert torch.equal(first, second)  # a request's seed gives its draws


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_engine_logprobs_are_the_forward_seams_logprobs(tiny_tokenizer, temperature):
    """The sampling logprobs an engine returns are log softmax(logits / T) of the tokens it drew
    (T = 1 when greedy): what the forward seam computes for the same sequences, up to the float
    differences between a KV-cached step and a full forward."""
    torch.manual_seed(0)
    model = build_tiny_model(tiny_tokenizer).eval()
    prompts = [user(t) for t in ("hi", "What is 12 + 30?", "Name a colour.")]
    gens = generate(model, tiny_tokenizer, prompts, 8, temperature=temperature, batch_size=2, generator_seed=1,
                    logprobs=True)
    seqs = join([prompt_ids(tiny_tokenizer, p) for p in prompts], [g.token_ids for g in gens],
                tiny_tokenizer.pad_token_id)
    with torch.no_grad():
        expected = logprobs(model, seqs, temperature or 1.0)
    for row, g in enumerate(gens):
        assert len(g.logprobs) == len(g.token_ids) > 0
        torch.testing.assert_close(torch.tensor(g.logprobs), expected[row, : len(g.token_ids)], atol=1e-4, rtol=1e-4)


def test_serving_streams_the_same_tokens_the_batch_decoder_gives(tiny_tokenizer):
    """`serve` and `chat` answer through the same decoder as the stages: greedy tokens agree."""
    from rlhfkit.generation import Answerer

    torch.manual_seed(0)
    model = build_tiny_model(tiny_tokenizer).eval()
    prompt = user("What is 12 + 30?")
    batch = generate(model, tiny_tokenizer, [prompt], 12)[0]
    streamed = list(Answerer(model, tiny_tokenizer).stream(prompt_ids(tiny_tokenizer, prompt), 12, 0.0))
    assert streamed == batch.token_ids
