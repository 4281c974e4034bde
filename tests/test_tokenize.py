from rlhfkit.data.records import Demonstration, Message, user
from rlhfkit.data.tokenize import (
    end_of_turn_id, fit, left_pad, left_pad_after_common_prefix, prompt_ids, tokenize_demonstration, turn_suffix_ids,
)


def test_labels_cover_response_and_end_of_turn_only(tiny_tokenizer):
    tok = tiny_tokenizer
    ex = tokenize_demonstration(tok, Demonstration(user("What is 2+2?"), "4"), max_len=128)
    labelled = ex.response  # the tokens the SFT loss covers
    assert tok.decode(labelled[:-1]) == "4"
    assert labelled[-1] == end_of_turn_id(tok) == tok.convert_tokens_to_ids("<|im_end|>")
    # the prompt ends with the generation prompt, so training matches what a rollout samples from
    assert tok.decode(ex.prompt).endswith("<|im_start|>assistant\n")


def test_turn_suffix_is_what_the_template_writes_after_the_end_of_turn(tiny_tokenizer):
    """ChatML writes `<|im_end|>\\n` after an assistant turn; a template that stops at its
    end-of-turn token (Llama 3 style) has no suffix."""
    import copy

    from rlhfkit.models import CHATML

    assert turn_suffix_ids(tiny_tokenizer) == tiny_tokenizer("\n", add_special_tokens=False)["input_ids"]
    bare = copy.deepcopy(tiny_tokenizer)
    bare.chat_template = CHATML.replace("'<|im_end|>' + '\n'", "'<|im_end|>'")
    assert bare.chat_template != CHATML and turn_suffix_ids(bare) == []


def test_training_ids_equal_the_rendered_conversation(tiny_tokenizer):
    tok = tiny_tokenizer
    msgs = [Message("user", "hi"), Message("assistant", "yo"), Message("user", "and?")]
    ex = tokenize_demonstration(tok, Demonstration(tuple(msgs), "done"), max_len=512)
    full = tok.apply_chat_template([m.to_dict() for m in msgs] + [{"role": "assistant", "content": "done"}], tokenize=False)
    assert tok.decode(ex.input_ids) == full.rstrip("\n")


def test_pad_is_not_eos(tiny_tokenizer):
    assert tiny_tokenizer.pad_token_id != tiny_tokenizer.eos_token_id


def test_the_shipped_tiny_tokenizer_is_the_one_learned_from_world_text():
    """The tiny model's merges ship as a file (so models never needs the task world); learning
    them again from the world's corpus gives the same file. To regenerate it after changing the
    world: TINY_TOKENIZER.write_text(train_tiny_tokenizer(tokenizer_corpus()).to_str(pretty=True) + "\\n")."""
    from rlhfkit.data.world import tokenizer_corpus
    from rlhfkit.models import TINY_TOKENIZER, build_tiny_tokenizer, train_tiny_tokenizer

    learned = train_tiny_tokenizer(tokenizer_corpus())
    assert learned.to_str(pretty=True) + "\n" == TINY_TOKENIZER.read_text()
    tok = build_tiny_tokenizer()
    assert len(tok) == 512 and tok.convert_ids_to_tokens([0, 1, 2]) == ["<|im_end|>", "<|pad|>", "<|im_start|>"]
    text = "Convert 3 km to metres."
    assert tok(text)["input_ids"] == learned.encode(text).ids and len(tok(text)["input_ids"]) < 0.6 * len(text.encode())


def test_no_double_bos_with_a_tokenizer_that_adds_bos():
    """A Llama-style tokenizer adds BOS itself and its template writes one too: keep one."""
    from rlhfkit.models import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    tok.add_special_tokens({"bos_token": "<s>"})
    tok.chat_template = "{{ bos_token }}" + tok.chat_template
    tok._tokenizer.post_processor = __import__("tokenizers").processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.bos_token_id)]
    )
    assert tok("x")["input_ids"][0] == tok.bos_token_id  # the tokenizer really does add BOS
    ids = prompt_ids(tok, user("hi"))
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id


def test_truncation_keeps_response_and_recent_context():
    prompt, response = list(range(100)), [900, 901, 902]
    ex = fit(prompt, response, max_len=20)
    assert ex.response == response and ex.prompt == prompt[-17:]
    assert ex.prompt_truncated and not ex.response_truncated
    long = fit(prompt, list(range(1000, 1050)), max_len=20)  # response alone too long
    assert len(long) == 20 and long.prompt == prompt[-10:] and long.response_truncated
    assert fit([1, 2], [3], 10) == fit([1, 2], [3], 10) and not fit([1, 2], [3], 10).prompt_truncated


def test_left_pad_aligns_prompt_ends():
    ids, mask = left_pad([[1, 2, 3], [4]], pad_id=0)
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_left_pad_after_common_prefix_keeps_the_shared_prefix_in_front():
    ids, mask, shared = left_pad_after_common_prefix([[7, 8, 1, 2, 3], [7, 8, 4], [7, 8, 9, 5]], pad_id=0)
    assert shared == 2
    assert ids.tolist() == [[7, 8, 1, 2, 3], [7, 8, 0, 0, 4], [7, 8, 0, 9, 5]]
    assert mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 1], [1, 1, 0, 1, 1]]
    # every row keeps a token after the prefix; nothing shared, or one prompt: plain left padding
    assert left_pad_after_common_prefix([[7, 8], [7, 8, 9]], 0)[2] == 1
    assert left_pad_after_common_prefix([[1, 2], [3]], 0)[2] == 0
    assert left_pad_after_common_prefix([[1, 2]], 0)[0].tolist() == [[1, 2]]
    # a shorter prefix, computed for more sequences than these, may be given
    ids, mask, shared = left_pad_after_common_prefix([[7, 8, 1, 2, 3], [7, 8, 4]], 0, shared=1)
    assert shared == 1 and ids.tolist() == [[7, 8, 1, 2, 3], [7, 0, 0, 8, 4]]


def test_huge_texts_are_cut_before_tokenising_without_changing_what_fit_keeps(tiny_tokenizer):
    """A 20 MB field tokenised whole took ~4 GB and minutes, to keep max_len tokens. The cut to
    max_len * CHARS_PER_TOKEN characters (the prompt's tail, the response's head) gives exactly
    the uncut fit, and the tokenizer never sees more than that."""
    from rlhfkit.data.tokenize import CHARS_PER_TOKEN, response_ids, tokenize_pair

    prompt, response, max_len = user("tell me " * 5_000 + "a story"), "once upon a time " * 5_000, 64
    uncut = fit(prompt_ids(tiny_tokenizer, prompt), response_ids(tiny_tokenizer, response), max_len)
    seen = []

    class Recording:
        def __getattr__(self, name):
            return getattr(tiny_tokenizer, name)

        def __call__(self, text, **kw):
            seen.append(len(text))
            return tiny_tokenizer(text, **kw)

    example, _ = tokenize_pair(Recording(), prompt, response, max_len)
    assert (example.prompt, example.response) == (uncut.prompt, uncut.response)
    assert example.prompt_truncated and example.response_truncated
    assert max(seen) < max_len * CHARS_PER_TOKEN + 200  # + the chat template's own text
