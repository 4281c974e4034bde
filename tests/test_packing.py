"""Packed forwards (rlhfkit.fast.packing): the layout by hand, and the same numbers as padded forwards
(the seam rlhfkit.logprobs with ``fast=True`` against ``fast=False``)."""

import pytest
import torch

from rlhfkit.data.tokenize import right_pad
from rlhfkit.models import build_tiny_model
from rlhfkit.fast.packing import balanced_rows, pack, shares_prefixes, spans, tree_rows
from rlhfkit.logprobs import logprobs, rewards, token_values
from rlhfkit.records import join
from rlhfkit.reward import build_reward_model
from tests.test_generation import tiny_gpt2


def verdicts(model) -> dict[str, bool]:
    """The packing checks the seam ran on ``model`` and their verdicts (cached on the model, one per
    head: ``logprobs``, ``values``, ``rewards``; see rlhfkit.fast.packing.packs_exactly)."""
    return model.__dict__.get("_rlhfkit_packs_exactly", {})


def test_balanced_rows_by_hand():
    # total 20 -> ceil(20 / 8) = 3 rows; longest first, each to the shortest row so far:
    # 7 -> r0, 5 -> r1, 4 -> r2, 3 -> r2 (4 < 5), 1 -> r1 (5 < 7, 5 < 7)
    assert balanced_rows([3, 7, 1, 5, 4], row_tokens=8) == [[1], [3, 2], [4, 0]]
    assert balanced_rows([10], row_tokens=4) == [[0]]  # a long sequence gets a row of its own size
    rows = balanced_rows(list(range(1, 40)), row_tokens=64)
    assert sorted(i for row in rows for i in row) == list(range(39))


def test_pack_lays_sequences_end_to_end_with_restarting_positions():
    packed = pack([torch.tensor([11, 12, 13]), torch.tensor([21, 22]), torch.tensor([31, 32, 33, 34])],
                  pad_id=0, row_tokens=5)
    # 9 tokens -> 2 rows: [seq 2] and [seq 0, seq 1]; the shorter row's tail is padding
    assert packed.input_ids.tolist() == [[31, 32, 33, 34, 0], [11, 12, 13, 21, 22]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 0], [0, 1, 2, 0, 1]]
    assert packed.row.tolist() == [1, 1, 0] and packed.columns.tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3]
    assert packed.attention_mask is None
    rows, columns, seq, within = spans(packed, torch.tensor([1, 0, 2]), torch.tensor([2, 1, 2]))
    assert packed.input_ids[rows, columns].tolist() == [12, 13, 21, 33, 34]
    assert seq.tolist() == [0, 0, 1, 2, 2] and within.tolist() == [0, 1, 0, 0, 1]


def test_pack_shares_prefixes_as_a_tree_by_hand():
    # sorted: [1 2 3 4], [1 2 3 4 5], [1 2 6], [7 8]; each adds what follows its common prefix
    # with the one before: [1 2 3 4], [5], [6], [7 8] -> one row of 8 columns
    sequences = [torch.tensor(s) for s in ([1, 2, 6], [1, 2, 3, 4, 5], [7, 8], [1, 2, 3, 4])]
    packed = pack(sequences, pad_id=0, row_tokens=16, share_prefixes=True)
    assert packed.input_ids.tolist() == [[1, 2, 3, 4, 5, 6, 7, 8]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 4, 2, 0, 1]]
    assert [packed.columns[f : f + n].tolist() for f, n in zip(packed.first, packed.length)] == [
        [0, 1, 5], [0, 1, 2, 3, 4], [6, 7], [0, 1, 2, 3]]
    mask = packed.attention_mask[0, 0].int().tolist()
    assert mask[4] == [1, 1, 1, 1, 1, 0, 0, 0]  # 5 sees its path 1 2 3 4 5
    assert mask[5] == [1, 1, 0, 0, 0, 1, 0, 0]  # 6 sees 1 2 and itself, not the 3 4 5 branch
    assert mask[7] == [0, 0, 0, 0, 0, 0, 1, 1]  # 8 sees only 7
    rows, columns, _, _ = spans(packed, packed.length - 1, torch.ones_like(packed.length))
    assert packed.input_ids[rows, columns].tolist() == [6, 5, 8, 4]  # each sequence's last token
    # when attention is costly, narrower rows win (see tree_rows); each row starts its own
    # tree (so [1 2 6] repeats 1 2), and padding sees only itself
    packed = pack(sequences, pad_id=0, share_prefixes=True, attention_width=1)
    assert packed.input_ids.tolist() == [[1, 2, 3, 4, 5], [1, 2, 6, 7, 8]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, 0, 1]]
    assert packed.attention_mask[1, 0, 2].int().tolist() == [1, 1, 1, 0, 0]
    # with [9] as well: rows of 6 cost 2 * 6 * 7 = 84, less than rows of 5 (three: 90) or one
    # row of 9 (90); the second row ends in padding
    packed = pack(sequences + [torch.tensor([9])], pad_id=0, share_prefixes=True, attention_width=1)
    assert packed.input_ids.tolist() == [[1, 2, 3, 4, 5, 6], [7, 8, 9, 0, 0, 0]]
    assert packed.attention_mask[1, 0, 3].int().tolist() == [0, 0, 0, 1, 0, 0]


def test_tree_rows_weighs_repeated_prefixes_against_attention_by_hand():
    # sorted lengths 4, 5, 3, 2 sharing 0, 4, 2, 0 with their predecessors (the batch above)
    lengths, shared = [4, 5, 3, 2], [0, 4, 2, 0]
    # one row: 4 + 1 + 1 + 2 = 8 wide. With attention_width 700: 8 * (1 + 8/700) = 8.09 against
    # two rows of 5 (the second repeats the 2 shared tokens): 2 * 5 * (1 + 5/700) = 10.07
    assert tree_rows(lengths, shared) == [0]
    # attention_width 1: one row 8 * 9 = 72; rows [0 1] [2 3] 2 * 5 * 6 = 60; rows of width 6
    # ([0 1 2] [3]) 2 * 6 * 7 = 84; capacity 5 is the cheapest
    assert tree_rows(lengths, shared, attention_width=1) == [0, 2]
    # attention_width 3: 8 * (1 + 8/3) = 29.3 against 10 * (1 + 5/3) = 26.7 -> still two rows;
    # attention_width 10: 8 * 1.8 = 14.4 against 10 * 1.5 = 15 -> one row
    assert tree_rows(lengths, shared, attention_width=3) == [0, 2]
    assert tree_rows(lengths, shared, attention_width=10) == [0]
    assert tree_rows([7], [0]) == [0] and tree_rows([], []) == [0]


def varied_batch():
    """The last sequence repeats the first one's prompt and first answer token: prefix-tree rows
    compute those tokens once for both."""
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [14, 15], [5, 6, 7]]
    responses = [[16, 17, 2], [18], [19, 20, 21, 22, 23, 24, 2], [16, 30, 31, 2]]
    return join(prompts, responses, pad_id=0)


@pytest.mark.parametrize("arch", ["llama-sdpa", "llama-eager", "gpt2"])
def test_packed_logprobs_entropy_and_gradients_equal_padded(tiny_tokenizer, arch):
    torch.manual_seed(0)
    model = (build_tiny_model(tiny_tokenizer) if arch.startswith("llama") else tiny_gpt2(tiny_tokenizer)).eval()
    if arch == "llama-eager":  # eager attention adds the mask to the scores: it needs it additive
        model.set_attn_implementation("eager")
    assert shares_prefixes(model)
    seqs = varied_batch()
    grads = []
    for fast in (True, False):
        model.zero_grad()
        logp, entropy = logprobs(model, seqs, 0.7, True, fast=fast)
        if fast:  # the packed path really ran: the model's check passed
            assert verdicts(model) == {"logprobs": True}
        (logp.sum() + (entropy * seqs.response_mask).sum()).backward()
        grads.append(next(p for p in model.parameters() if p.grad is not None).grad.clone())
        if fast:
            first = (logp.detach(), entropy.detach() * seqs.response_mask)
    assert torch.allclose(first[0], logp.detach(), atol=1e-5)
    assert torch.allclose(first[1], entropy.detach() * seqs.response_mask, atol=1e-5)
    assert (first[0][seqs.response_mask == 0] == 0).all()
    assert torch.allclose(grads[0], grads[1], atol=1e-5)


def test_packed_values_and_rewards_equal_padded(tiny_tokenizer):
    value = build_reward_model("tiny", tiny_tokenizer, seed=0)
    seqs = varied_batch()
    assert torch.allclose(token_values(value, seqs, fast=True), token_values(value, seqs, fast=False), atol=1e-5)
    assert verdicts(value) == {"values": True}  # the packed path really ran
    sequences = [[5, 6, 7, 16, 2], [8, 9, 2], [14, 15, 19, 20, 21, 22, 2]]
    pad_id = tiny_tokenizer.pad_token_id  # the head reads each row at its last non-pad token
    padded = value(*right_pad(sequences, pad_id)).logits[:, 0]
    assert torch.allclose(rewards(value, sequences, pad_id, fast=False), padded, atol=1e-5)
    assert torch.allclose(rewards(value, sequences, pad_id, fast=True), padded, atol=1e-5)
    # the value head and the reward head were each checked once, not one verdict for both
    assert verdicts(value) == {"values": True, "rewards": True}


class IgnoresPositions(torch.nn.Module):
    """A backbone that drops position ids: packed sequences would attend across each other."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, **kwargs):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, **kwargs)


class IgnoresMask(IgnoresPositions):
    """A backbone that drops a custom attention mask: in a prefix tree, branches see each other."""

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, **kwargs):
        return self.inner(input_ids=input_ids, position_ids=position_ids, **kwargs)


def test_a_model_that_drops_the_prefix_tree_mask_is_detected(tiny_tokenizer):
    model = build_tiny_model(tiny_tokenizer)
    model.model = IgnoresMask(model.model)
    with pytest.warns(UserWarning, match="using padded forwards"):
        logprobs(model, varied_batch())
    assert verdicts(model) == {"logprobs": False}


def test_a_model_that_cannot_pack_is_detected_and_scored_padded(tiny_tokenizer):
    model = build_tiny_model(tiny_tokenizer)
    seqs = varied_batch()
    expected = logprobs(model, seqs, fast=False).detach()
    model.model = IgnoresPositions(model.model)
    with pytest.warns(UserWarning, match="using padded forwards"):
        got = logprobs(model, seqs).detach()
    assert verdicts(model) == {"logprobs": False}
    assert torch.allclose(got, expected, atol=1e-5)


def test_demonstration_nll_is_the_response_tokens_cross_entropy(tiny_tokenizer):
    """The SFT loss numerator, packed, against the textbook computation on one unpadded forward
    per example: -sum log p(response token t | everything before it)."""
    from rlhfkit.data.tokenize import Example
    from rlhfkit.logprobs import demonstration_nll

    model = build_tiny_model(tiny_tokenizer)
    examples = [Example([5, 6, 7], [16, 17, 2]), Example([8, 9, 10, 11], [18, 2]), Example([14], [19, 20, 21, 2])]
    expected, count = 0.0, 0
    for ex in examples:
        logp = torch.log_softmax(model(input_ids=torch.tensor([ex.input_ids])).logits[0], -1)
        for t, token in enumerate(ex.response):
            expected -= float(logp[len(ex.prompt) - 1 + t, token])
            count += 1
    nll, n = demonstration_nll(model, examples, pad_id=0)
    assert n == count == 9 and abs(float(nll) - expected) < 1e-4


def test_a_model_prepared_by_accelerate_in_bf16_still_packs(tiny_tokenizer):
    """Accelerate's mixed precision wraps the model's forward in a bf16 autocast. The packing check
    must compare the model's own fp32 forwards (it once compared bf16 padded against fp32 packed,
    failed, and silently sent every SFT, RM and PPO forward of the default pipeline to padding)."""
    from rlhfkit.train.loop import make_accelerator  # resets accelerate's process-wide precision

    acc = make_accelerator("bf16")
    model = acc.prepare(build_tiny_model(tiny_tokenizer))
    assert "forward" in model.__dict__  # the autocast patch
    seqs = varied_batch()
    with acc.autocast():  # where training runs its forwards
        logprobs(model, seqs)
    assert verdicts(model) == {"logprobs": True}
    assert "forward" in model.__dict__  # and it is put back
    acc = make_accelerator("bf16")
    value = acc.prepare(build_reward_model("tiny", tiny_tokenizer, seed=0))
    with acc.autocast():
        token_values(value, seqs)
        rewards(value, [[5, 6, 7, 16, 2], [8, 9, 2]], tiny_tokenizer.pad_token_id)
    assert verdicts(value) == {"values": True, "rewards": True}
    assert "forward" in value.__dict__
