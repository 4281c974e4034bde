"""``--model.offload-frozen``: the frozen reference and reward model keep their weights in host
memory and move them layer by layer for each forward (accelerate's cpu_offload). On a CPU the
flag changes nothing (the weights live there anyway), so the mechanism is tested here with the
CPU as the execution device: the same numbers, and no weights held between forwards."""

import torch

from rlhfkit.logprobs import logprobs, rewards
from rlhfkit.models import build_tiny_model, frozen_copy, input_device, offload_to_host
from rlhfkit.reward import build_reward_model
from tests.test_packing import varied_batch


def test_an_offloaded_reference_gives_the_same_logprobs_and_holds_no_weights(tiny_tokenizer):
    torch.manual_seed(0)
    policy = build_tiny_model(tiny_tokenizer)
    reference = frozen_copy(policy)
    offloaded = offload_to_host(frozen_copy(policy), device=torch.device("cpu"))
    assert all(p.is_meta for p in offloaded.parameters())  # between forwards: nothing on the device
    assert input_device(offloaded) == torch.device("cpu")  # inputs go where the forward runs
    seqs = varied_batch()
    with torch.no_grad():
        for fast in (True, False):  # packed forwards call the backbone and head directly: hooked too
            assert torch.equal(logprobs(offloaded, seqs, fast=fast), logprobs(reference, seqs, fast=fast))
    assert all(p.is_meta for p in offloaded.parameters())
    assert not any(p.requires_grad for p in reference.parameters()) and not reference.training


def test_an_offloaded_reward_model_scores_the_same(tiny_tokenizer):
    value = build_reward_model("tiny", tiny_tokenizer, seed=0).eval()
    offloaded = offload_to_host(frozen_copy(value), device=torch.device("cpu"))
    sequences = [[5, 6, 7, 16, 2], [8, 9, 2], [14, 15, 19, 20, 21, 22, 2]]
    pad_id = tiny_tokenizer.pad_token_id
    with torch.no_grad():
        for fast in (True, False):
            assert torch.equal(rewards(offloaded, sequences, pad_id, fast=fast), rewards(value, sequences, pad_id, fast=fast))


def test_on_a_cpu_offloading_leaves_the_model_as_it_is(tiny_tokenizer):
    model = build_tiny_model(tiny_tokenizer)
    assert offload_to_host(model) is model  # no accelerator: its weights are in host memory already
