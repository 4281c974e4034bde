import pytest
import torch

from rlhfkit.config import BatchConfig, OptimConfig
from rlhfkit.runs import flatten_optimizer_state, unflatten_optimizer_state
from rlhfkit.train import sharding
from rlhfkit.train.loop import DataOrder, build_optimizer, lr_factor, micro_batches


def test_lr_warmup_then_cosine_to_zero():
    assert lr_factor(0, 4, 20, "cosine") == 1 / 5
    assert lr_factor(3, 4, 20, "cosine") == 4 / 5
    assert lr_factor(4, 4, 20, "cosine") == 1.0
    assert abs(lr_factor(12, 4, 20, "cosine") - 0.5) < 1e-12  # halfway through the decay
    assert lr_factor(20, 4, 20, "cosine") == 0.0
    assert lr_factor(12, 4, 20, "linear") == 0.5
    assert lr_factor(19, 4, 20, "constant") == 1.0


def test_data_order_is_a_function_of_step_and_covers_each_epoch():
    order = DataOrder(n=10, seed=3)
    first_epoch = order.batch(0, 5) + order.batch(1, 5)
    assert sorted(first_epoch) == list(range(10))
    assert order.batch(7, 5) == DataOrder(n=10, seed=3).batch(7, 5)  # resumable: no hidden state
    assert order.batch(0, 5) != DataOrder(n=10, seed=4).batch(0, 5)
    straddling = order.batch(1, 7)  # indices 7..13 of the stream cross into epoch 1
    assert straddling[:3] == order._epoch(0)[7:] and straddling[3:] == order._epoch(1)[:4]


def test_micro_batches_two_ranks_cover_same_data_as_one_rank_with_double_accumulation():
    indices = list(range(16))
    one = micro_batches(indices, BatchConfig(micro_batch_size=4, grad_accum=4), rank=0, world=1)
    two = [micro_batches(indices, BatchConfig(micro_batch_size=4, grad_accum=2), rank=r, world=2) for r in (0, 1)]
    assert sorted(sum(one, [])) == indices
    assert sorted(sum(two[0] + two[1], [])) == indices
    assert not set(sum(two[0], [])) & set(sum(two[1], []))


def test_optimizer_state_round_trips_through_flat_tensors():
    model = torch.nn.Linear(3, 2)
    opt = build_optimizer(model.parameters(), OptimConfig(lr=0.1))
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    weights, state = sharding.state_dicts(model, opt)
    tensors, meta = flatten_optimizer_state(state)
    import json

    meta = json.loads(json.dumps(meta))  # what a checkpoint stores
    restored = unflatten_optimizer_state(tensors, meta)
    model2 = torch.nn.Linear(3, 2)
    opt2 = build_optimizer(model2.parameters(), OptimConfig(lr=0.1))
    sharding.load_state_dicts(model2, opt2, weights, restored)
    assert torch.equal(model2.weight, model.weight)
    import pytest

    from rlhfkit.errors import RlhfkitError

    with pytest.raises(RlhfkitError, match="ckpt does not fit this model: 1 trainable weights missing"):
        sharding.load_state_dicts(model2, opt2, {"bias": weights["bias"]}, restored, where="ckpt")
    with pytest.raises(RlhfkitError, match="1 unknown"):
        sharding.load_state_dicts(model2, opt2, {**weights, "lora.weight": weights["bias"]}, restored, where="ckpt")
    for pid, state in opt.state_dict()["state"].items():
        for key, value in state.items():
            assert torch.equal(opt2.state_dict()["state"][pid][key], value)
    assert opt2.param_groups[0]["betas"] == opt.param_groups[0]["betas"]


def test_resume_refuses_changed_settings_but_not_a_moved_folder_or_more_steps(tmp_path):
    """A resumed run must be the uninterrupted one: a changed learning rate is refused, naming it;
    a longer run, or the same run copied to another folder, resumes."""
    import pytest

    from rlhfkit.cli import parse
    from rlhfkit.config import save_config
    from rlhfkit.errors import RlhfkitError
    from rlhfkit.runs import check_same_config

    saved = tmp_path / "config.yaml"
    save_config(parse("sft", ["--recipe", "tiny", "--run.out", "a", "--run.steps", "10"]), saved)
    check_same_config(saved, parse("sft", ["--recipe", "tiny", "--run.out", "b", "--run.steps", "20", "--run.resume"]))
    with pytest.raises(RlhfkitError, match="optim.lr"):
        check_same_config(saved, parse("sft", ["--recipe", "tiny", "--run.out", "a", "--optim.lr", "0.1"]))
    # A moved pipeline: the PPO stage names its sibling SFT folder, which moved with it.
    save_config(parse("ppo", ["--recipe", "tiny", "--run.out", "runs/x/ppo", "--model.name", "runs/x/sft"]), saved)
    check_same_config(saved, parse("ppo", ["--recipe", "tiny", "--run.out", "elsewhere/y/ppo", "--model.name", "elsewhere/y/sft"]))
    with pytest.raises(RlhfkitError, match="model.name"):  # another SFT model is another run
        check_same_config(saved, parse("ppo", ["--recipe", "tiny", "--run.out", "runs/x/ppo", "--model.name", "runs/x/sft2"]))


def test_optimizer_gives_weights_mapped_from_a_checkpoint_their_own_memory(tmp_path, tiny_tokenizer):
    """fp32 weights loaded from safetensors stay views of the copy-on-write file mapping; the
    optimizer's first update would fault on every page. build_optimizer copies them once:
    afterwards no trainable weight is file-mapped, values and tied weights are unchanged, and a
    frozen weight is left mapped (reads do not copy)."""
    from transformers import AutoModelForCausalLM

    from rlhfkit.models import build_tiny_model
    from rlhfkit.fast.memory import copy_file_mapped, file_mapped_ranges, in_file_mapping

    build_tiny_model(tiny_tokenizer, seed=0).save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)

    import sys

    import numpy as np
    import pytest

    if not sys.platform.startswith("linux"):
        pytest.skip("file mappings are read from /proc/self/maps (Linux only)")

    def mapped(p: torch.Tensor) -> bool:
        return in_file_mapping(p, file_mapped_ranges())

    # The lookup itself, on known memory: a copy-on-write file mapping, and fresh memory.
    (tmp_path / "floats").write_bytes(np.arange(4096, dtype=np.float32).tobytes())
    assert mapped(torch.from_numpy(np.memmap(tmp_path / "floats", dtype=np.float32, mode="c")))
    assert not mapped(torch.zeros(4096))

    params = dict(model.named_parameters())
    before = {name: p.detach().clone() for name, p in params.items()}
    frozen = params["model.norm.weight"].requires_grad_(False)
    assert mapped(frozen)
    build_optimizer(model.parameters(), OptimConfig(lr=0.1))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and not any(mapped(p) for p in trainable)
    assert mapped(frozen)
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name
    if model.config.tie_word_embeddings:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    assert copy_file_mapped(trainable) == 0  # nothing left to copy


def test_an_update_without_any_gradient_has_norm_zero_and_still_advances_the_schedule():
    """GRPO skips the backward when every advantage is 0; with clipping off that used to raise
    'stack expects a non-empty TensorList'."""
    from rlhfkit.train.loop import build_scheduler, optimizer_step

    model = torch.nn.Linear(2, 2)
    for max_grad_norm in (1.0, 0.0):
        optim = OptimConfig(lr=0.1, warmup_steps=0, schedule="linear")
        opt = build_optimizer(model.parameters(), optim)
        scheduler = build_scheduler(opt, optim, 10)
        assert optimizer_step(model, opt, scheduler, max_grad_norm) == (0.0, False)
        assert scheduler.get_last_lr()[0] == pytest.approx(0.1 * 0.9)


@pytest.mark.parametrize("minutes, expected", [(1e-7, ["step-0000001", "step-0000002"]), (0, [])])
def test_checkpoints_are_also_written_by_time(minutes, expected, tmp_path):
    """Slow steps: 30 steps between checkpoints was 25 minutes of CPU SFT lost to an interrupt."""
    from rlhfkit.cli import parse
    from rlhfkit.train import sft

    out = tmp_path / "sft"
    sft.train(parse("sft", ["--recipe", "tiny", "--run.steps", "3", "--run.save-every", "100",
                            "--run.save-every-minutes", str(minutes), "--eval.gold-prompts", "0", "--eval.no-at-start",
                            "--data.world-examples", "32", "--batch.micro-batch-size", "4", "--run.out", str(out)]))
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == expected  # never at the last step


def test_resume_accepts_a_setting_added_since_at_its_default_and_compares_top_level_ones(tmp_path):
    """A run saved before a field existed (run.save_every_minutes, model.lora_target_modules)
    resumes when the field keeps its default; PPO's top-level `reward` is a setting like any other."""
    import yaml

    from rlhfkit.cli import parse
    from rlhfkit.config import save_config
    from rlhfkit.errors import RlhfkitError
    from rlhfkit.runs import check_same_config

    saved = tmp_path / "config.yaml"
    old = yaml.safe_load(yaml.safe_dump(__import__("dataclasses").asdict(parse("ppo", ["--recipe", "tiny", "--run.out", "a"]))))
    del old["run"]["save_every_minutes"]
    save_config(old, saved)
    check_same_config(saved, parse("ppo", ["--recipe", "tiny", "--run.out", "a"]))
    with pytest.raises(RlhfkitError, match="run.save_every_minutes"):
        check_same_config(saved, parse("ppo", ["--recipe", "tiny", "--run.out", "a", "--run.save-every-minutes", "1"]))
    with pytest.raises(RlhfkitError, match="reward"):
        check_same_config(saved, parse("ppo", ["--recipe", "tiny", "--run.out", "a", "--reward", "gold"]))
    # A whole section added since (`rollout`): its defaults resume, another setting does not.
    del old["rollout"]
    save_config(old, saved)
    check_same_config(saved, parse("ppo", ["--recipe", "tiny", "--run.out", "a"]))
    with pytest.raises(RlhfkitError, match="rollout.engine"):
        check_same_config(saved, parse("ppo", ["--recipe", "tiny", "--run.out", "a", "--rollout.engine", "vllm"]))


def test_step_timers_hear_every_step_begin_and_end_of_a_stage(tmp_path, monkeypatch):
    """Benchmarks time steps through loop.STEP_TIMERS: step k begins when its batch is drawn and
    ends before its evaluation, logging and checkpoint."""
    from rlhfkit.cli import parse
    from rlhfkit.train import loop, sft

    heard = []

    class Timer:
        def step_begin(self, step):
            heard.append(("begin", step))

        def step_end(self, done):
            heard.append(("end", done))

    monkeypatch.setattr(loop, "STEP_TIMERS", [Timer()])
    flags = ["--recipe", "tiny", "--run.save-every", "2", "--eval.gold-prompts", "0", "--eval.no-at-start",
             "--data.world-examples", "32", "--batch.micro-batch-size", "4", "--run.out", str(tmp_path / "sft")]
    sft.train(parse("sft", [*flags, "--run.steps", "3"]))
    assert heard == [("begin", 1), ("end", 1), ("begin", 2), ("end", 2), ("begin", 3), ("end", 3)]


def test_a_finished_stage_writes_its_model_then_complete_json_and_a_resume_returns_before_loading(tmp_path,
                                                                                                 monkeypatch):
    """run.finish saves the model folder and then complete.json (stage, steps, final metrics);
    resuming the complete run returns its folder before any data or model is loaded."""
    import json

    from rlhfkit.cli import parse
    from rlhfkit.train import sft

    flags = ["--recipe", "tiny", "--run.steps", "2", "--eval.gold-prompts", "0", "--eval.no-at-start",
             "--data.world-examples", "32", "--batch.micro-batch-size", "4", "--run.out", str(tmp_path / "sft")]
    out = sft.train(parse("sft", flags))
    complete = json.loads((out / "complete.json").read_text())
    assert complete["stage"] == "sft" and complete["steps"] == 2 and "train/loss" in complete
    assert (out / "model.safetensors").stat().st_mtime <= (out / "complete.json").stat().st_mtime

    def no_loading(*args, **kwargs):
        raise AssertionError("a complete stage loaded its data or model")

    monkeypatch.setattr(sft, "load_model", no_loading)
    monkeypatch.setattr(sft, "load_data", no_loading)
    assert sft.train(parse("sft", [*flags, "--run.resume"])) == out
