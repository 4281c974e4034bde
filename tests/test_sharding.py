"""What a launch asks for, read from the environment accelerate's config files set; sharded
training itself is tested on 2 processes in tests/test_processes.py."""

import json
import os
import sys

import pytest
import torch

from rlhfkit import processes
from rlhfkit.errors import RlhfkitError
from rlhfkit.train.sharding import Sharding, require_deepspeed, skeleton


@pytest.fixture
def launch(monkeypatch):
    for name in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED", "FSDP_VERSION", "FSDP_OFFLOAD_PARAMS",
                 "FSDP_RESHARD_AFTER_FORWARD", "FSDP_ACTIVATION_CHECKPOINTING", "FSDP_CPU_RAM_EFFICIENT_LOADING",
                 processes.DEEPSPEED, "ACCELERATE_DEEPSPEED_ZERO_STAGE", "ACCELERATE_DEEPSPEED_CONFIG_FILE",
                 "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE"):
        monkeypatch.delenv(name, raising=False)
    return lambda **env: [monkeypatch.setenv(k, v) for k, v in env.items()]


def test_an_fsdp2_config_shards_with_its_settings(launch):
    assert Sharding.requested(2) == Sharding()  # DDP (or one process): nothing asked
    launch(ACCELERATE_USE_FSDP="true", FSDP_VERSION="2", FSDP_CPU_RAM_EFFICIENT_LOADING="true")
    assert Sharding.requested(2) == Sharding(fsdp=True, cpu_offload=False, reshard_after_forward=True)
    # else transformers loads every model as meta tensors on all but the main process
    assert os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] == "false"
    assert Sharding.requested(1) == Sharding()  # one process: nothing to split
    launch(FSDP_OFFLOAD_PARAMS="true", FSDP_RESHARD_AFTER_FORWARD="false")
    assert Sharding.requested(2) == Sharding(fsdp=True, cpu_offload=True, reshard_after_forward=False)


def test_a_deepspeed_config_is_taken_from_accelerate_and_read_into_zero_settings(launch, tmp_path):
    launch(ACCELERATE_USE_DEEPSPEED="true", ACCELERATE_DEEPSPEED_ZERO_STAGE="3",
           ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE="cpu")
    processes.claim_deepspeed()  # accelerate must not set DeepSpeed up itself
    assert os.environ["ACCELERATE_USE_DEEPSPEED"] == "false" and os.environ[processes.DEEPSPEED] == "true"
    offload = torch.accelerator.is_available()  # on a CPU the partitions already live in host memory
    assert Sharding.requested(2) == Sharding(zero={"stage": 3, **({"offload_optimizer": {"device": "cpu"}} if offload else {})})
    assert Sharding.requested(2).zero_stage == 3 and Sharding().zero_stage == 0
    assert Sharding.requested(1) == Sharding()  # one process: nothing to split
    config = tmp_path / "ds.json"  # a DeepSpeed config file lends its zero_optimization section
    config.write_text(json.dumps({"zero_optimization": {"stage": 2, "reduce_bucket_size": "auto", "overlap_comm": True},
                                  "train_batch_size": "auto"}))
    launch(ACCELERATE_DEEPSPEED_CONFIG_FILE=str(config))
    assert Sharding.requested(2) == Sharding(zero={"stage": 2, "overlap_comm": True})  # "auto": DeepSpeed's default


@pytest.mark.parametrize("env, said", [
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "0"},
     "zero_stage is '0': rlhfkit drives ZeRO stages 1, 2 and 3 .* configs/accelerate/ddp.yaml"),
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": "{tmp}/ds.json"},
     "ds.json: `bf16.enabled`: rlhfkit keeps fp32 weights"),
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": "{tmp}/missing.json"},
     "DeepSpeed config .*missing.json: .*No such file"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, "FSDP version 1; rlhfkit shards with FSDP2 only"),
    ({"ACCELERATE_USE_FSDP": "true"}, "FSDP version 1"),  # accelerate's default version
])
def test_what_is_not_driven_stops_with_what_to_launch_instead(launch, env, said, tmp_path):
    (tmp_path / "ds.json").write_text(json.dumps({"bf16": {"enabled": True}, "zero_optimization": {"stage": 3}}))
    launch(**{k: v.format(tmp=tmp_path) for k, v in env.items()})
    with pytest.raises(RlhfkitError, match=said):
        Sharding.requested(2)


def test_deepspeed_missing_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # import deepspeed raises ImportError
    with pytest.raises(RlhfkitError, match=r"pip install 'rlhfkit\[deepspeed\]'"):
        require_deepspeed()


def test_a_skeleton_holds_no_weights_and_keeps_tied_ones_tied(tiny_tokenizer):
    from rlhfkit.models import build_tiny_model

    model = build_tiny_model(tiny_tokenizer)
    empty = skeleton(model)
    assert all(p.is_meta for p in empty.parameters())
    assert empty.lm_head.weight is empty.model.embed_tokens.weight  # tied in the tiny model too
    assert [n for n, _ in empty.named_parameters()] == [n for n, _ in model.named_parameters()]
    assert all(not b.is_meta for b in empty.buffers())  # rotary frequencies are not in a state dict
    assert model.lm_head.weight.device == torch.device("cpu")  # the original is untouched


def test_gradient_checkpointing_recomputes_to_the_same_gradients(tiny_tokenizer):
    """Recomputing each block's activations in the backward changes memory, not numbers: the same
    loss and gradients (fp32), for the policy and for LoRA on it."""
    from rlhfkit.config import ModelConfig
    from rlhfkit.models import apply_lora, build_tiny_model, enable_gradient_checkpointing

    ids = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    for lora in (False, True):
        grads = []
        for checkpointing in (False, True):
            model = build_tiny_model(tiny_tokenizer, seed=0)
            if lora:
                model = apply_lora(model, ModelConfig(lora=True, lora_r=4))
            if checkpointing:
                enable_gradient_checkpointing(model)
                assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
            model.train()
            torch.manual_seed(1)  # the same dropout masks (LoRA's) with and without; the recompute replays them
            model(input_ids=ids, labels=ids).loss.backward()
            grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
        assert grads[0].keys() == grads[1].keys() and grads[0]
        for name in grads[0]:
            torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("rank, whole, part", [
    (0, [1.0, 2.0, 3.0], [1.0, 2.0]),
    (1, [1.0, 2.0, 3.0], [3.0, 0.0]),  # the last partition is padded with zeros
    (0, [5.0], [5.0]),
    (1, [5.0], [0.0]),  # a one-element bias (PPO's value head) on 2 processes: all padding
])
def test_a_zero3_partition_is_the_rank_s_slice_padded_at_the_end(monkeypatch, rank, whole, part):
    """ZeRO-3 gives each of N processes ceil(numel / N) elements of a weight, zero-padded at the
    end; a resumed run writes each process's part of the whole saved tensor by hand, since
    DeepSpeed's safe_set_full_* slices without the padding (stage3.py set_full_hp_param)."""
    from types import SimpleNamespace

    from rlhfkit.train.sharding import _zero3_part

    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: rank)
    p = SimpleNamespace(ds_tensor=torch.empty(len(part)), ds_process_group=None)
    assert _zero3_part(p, torch.tensor(whole)).tolist() == part
