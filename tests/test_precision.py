"""`precision: auto`: the rule, the measurement, its cache, and every stage resolving it first."""

import json

import pytest
import yaml

from rlhfkit import precision
from rlhfkit.errors import ConfigError
from rlhfkit.precision import SMOLLM2_SHAPE, TINY_SHAPE, LayerShape, choose, layer_shape, resolve


@pytest.fixture
def measured(monkeypatch, tmp_path):
    """`auto` without RLHFKIT_PRECISION, a private cache, and a fake measurement that records
    its calls: ``measured.times`` is what it returns, ``measured.calls`` how often it ran."""
    monkeypatch.delenv(precision.ENV, raising=False)
    monkeypatch.setenv("RLHFKIT_CACHE", str(tmp_path / "cache"))
    precision.auto_choice.cache_clear()

    class Fake:
        times = (0.010, 0.004)
        calls = 0

    def fake_measure(shape):
        Fake.calls += 1
        return Fake.times

    monkeypatch.setattr(precision, "measure", fake_measure)
    monkeypatch.setattr(precision, "busy_machine_warning", lambda threads=None: None)  # a quiet machine
    yield Fake
    precision.auto_choice.cache_clear()


def test_bf16_must_win_clearly():
    assert choose(1.0, 0.5) == "bf16"
    assert choose(1.0, 0.79) == "bf16"
    assert choose(1.0, 0.8) == "fp32"  # 20% faster is the least bf16's rounding is worth
    assert choose(1.0, 0.95) == "fp32"
    assert choose(0.0057, 0.135) == "fp32"  # Zen 3: one SmolLM2 linear, fp32 vs bf16 autocast
    assert choose(1.0, None) == "fp32"  # bf16 autocast failed


def test_explicit_settings_pass_through_and_others_are_refused(measured):
    assert resolve("fp32", "tiny") == "fp32" and resolve("bf16", "tiny") == "bf16"
    assert measured.calls == 0
    with pytest.raises(ConfigError, match="'fp16'"):
        resolve("fp16", "tiny")


def test_auto_measures_once_caches_and_says_why(measured, capsys):
    said = []
    assert resolve("auto", "tiny", said.append) == "bf16"
    assert measured.calls == 1
    assert "precision auto -> bf16" in said[0] and "10 ms in fp32, 4 ms in bf16" in said[0] and "cached in" in said[0]
    cache = json.loads((precision.cache_file()).read_text())
    (key, entry), = cache.items()
    assert entry["precision"] == "bf16" and key.endswith("128x352") and "torch" in key

    precision.auto_choice.cache_clear()  # a new process: reads the cache instead of measuring
    measured.times = (0.010, 0.020)
    assert resolve("auto", "tiny", said.append) == "bf16" and measured.calls == 1
    assert "measured earlier" in said[1]


def test_the_cache_is_per_layer_shape_and_a_busy_machine_is_not_cached(measured, monkeypatch):
    resolve("auto", "tiny", None)
    measured.times = (0.010, 0.020)
    assert resolve("auto", "smollm2-135m-instruct", None) == "fp32"  # another shape: measured
    assert measured.calls == 2
    said = []
    monkeypatch.setattr(precision, "busy_machine_warning", lambda threads=None: "busy")
    precision.auto_choice.cache_clear()
    assert resolve("auto", "tiny", said.append) == "bf16" and measured.calls == 2  # the cached answer
    layer = precision.LayerShape(64, 128, 2, 2)
    monkeypatch.setattr(precision, "layer_shape", lambda model: layer)
    resolve("auto", "other", said.append)
    assert measured.calls == 3 and "not cached" in said[-1]
    precision.auto_choice.cache_clear()
    resolve("auto", "other", said.append)
    assert measured.calls == 4  # measured again: a busy machine's timings are not kept


def test_the_environment_fixes_auto_without_measuring(measured, monkeypatch):
    monkeypatch.setenv(precision.ENV, "fp32")
    said = []
    assert resolve("auto", "tiny", said.append) == "fp32" and measured.calls == 0
    assert said == []  # chosen by the user, like a flag: nothing to announce
    precision.auto_choice.cache_clear()
    monkeypatch.setenv(precision.ENV, "half")
    with pytest.raises(ConfigError, match=f"{precision.ENV}='half'"):
        resolve("auto", "tiny", None)


def test_layer_shapes_of_builtin_folder_and_adapter_models(tmp_path, monkeypatch):
    monkeypatch.setenv("RLHFKIT_CACHE", str(tmp_path / "empty-cache"))  # SmolLM2 not converted yet
    assert layer_shape("tiny") == TINY_SHAPE
    assert layer_shape("smollm2-135m-instruct") == SMOLLM2_SHAPE
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"n_embd": 768, "n_head": 12}))
    assert layer_shape(str(gpt2)) == LayerShape(768, 3072, 12, 12)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(gpt2)}))
    assert layer_shape(str(adapter)) == LayerShape(768, 3072, 12, 12)


def test_the_measurement_times_both_precisions_on_one_thread_and_restores_the_count():
    import torch

    threads = torch.get_num_threads()
    fp32, bf16 = precision.measure(TINY_SHAPE, tokens=32, min_reps=1, max_reps=2, min_seconds=0.0)
    assert fp32 > 0 and (bf16 is None or bf16 > 0)
    assert torch.get_num_threads() == threads


def test_the_machine_key_names_the_cpu():
    from pathlib import Path

    key = precision.machine_key(TINY_SHAPE)
    if Path("/proc/cpuinfo").exists():
        assert "flags " in key and not key.startswith("|")  # /proc/cpuinfo's keys end in tabs


def test_unresolved_auto_never_reaches_autocast():
    from rlhfkit.precision import autocast
    from rlhfkit.train.loop import make_accelerator

    with pytest.raises(ValueError, match="resolve"):
        autocast("auto")
    with pytest.raises(ValueError, match="resolve"):
        make_accelerator("auto")


def test_a_stage_resolves_auto_records_the_choice_and_resumes(measured, tmp_path, capsys):
    """The saved config holds what ran (bf16 here), and resuming with `auto` again agrees with it."""
    from rlhfkit.cli import parse
    from rlhfkit.train import sft

    flags = ["--recipe", "tiny", "--model.precision", "auto", "--run.steps", "2", "--run.save-every", "1",
             "--eval.gold-prompts", "0", "--eval.no-at-start", "--data.world-examples", "32", "--batch.micro-batch-size", "4",
             "--run.out", str(tmp_path / "sft")]
    sft.train(parse("sft", flags))
    saved = yaml.safe_load((tmp_path / "sft" / "config.yaml").read_text())
    assert saved["model"]["precision"] == "bf16"
    assert "precision auto -> bf16" in capsys.readouterr().err
    sft.train(parse("sft", [*flags, "--run.resume"]))  # `auto` again: not "the config changed"
    assert measured.calls == 1


def test_a_busy_machine_with_several_threads_gets_a_warning(monkeypatch):
    import os

    import torch

    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(os, "getloadavg", lambda: (9.7, 9.0, 9.0))
    assert "OMP_NUM_THREADS=1" in precision.busy_machine_warning() and "load 9.7 on 2 cores" in precision.busy_machine_warning()
    monkeypatch.setattr(os, "getloadavg", lambda: (1.2, 1.0, 1.0))
    assert precision.busy_machine_warning() is None
    monkeypatch.setattr(os, "getloadavg", lambda: (9.7, 9.0, 9.0))
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert precision.busy_machine_warning() is None


def test_a_mistyped_folder_is_refused_before_measuring(measured, tmp_path):
    from rlhfkit.errors import RlhfkitError

    with pytest.raises(RlhfkitError, match="no such folder"):
        resolve("auto", str(tmp_path / "runs" / "nope" / "ppo"), None)
    assert measured.calls == 0


def test_a_hub_id_not_downloaded_yet_is_measured_at_a_default_shape_without_the_network(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert layer_shape("someone/not-downloaded-model") == precision.DEFAULT_SHAPE


def test_the_seams_precision_is_per_thread_and_restored_after_a_block():
    """The forward seam runs in the stage's precision; a reward model scored with its own
    (``running_in``) changes it for that block and that thread only, as autocast itself."""
    import threading

    import torch

    from rlhfkit.logprobs import precision_context, running_in, set_precision

    def bf16_now() -> bool:
        with precision_context():
            return torch.is_autocast_enabled("cpu")

    set_precision("fp32")
    seen = []
    entered, release = threading.Event(), threading.Event()

    def other():
        with running_in("bf16"):
            seen.append(bf16_now())
            entered.set()
            release.wait(10)
        seen.append(bf16_now())

    thread = threading.Thread(target=other)
    thread.start()
    assert entered.wait(10)
    assert not bf16_now()  # the other thread's block leaves this one in fp32
    release.set()
    thread.join()
    assert seen == [True, False]
    with running_in("bf16"):
        assert bf16_now()
    assert not bf16_now()


def test_logprobs_come_from_fp32_logits_under_bf16(tiny_tokenizer):
    """Under bf16 autocast the LM head's output would be bf16, rounding each token's logprob by
    ~0.03 on SmolLM2 (issue 27); the seam runs the head in fp32 over the final hidden state, on
    the packed path and the padded one, and leaves the head as it was."""
    import torch

    from rlhfkit.logprobs import logprobs, output_head, precision_context, response_logits, running_in
    from rlhfkit.models import build_tiny_model
    from tests.test_packing import varied_batch

    model = build_tiny_model(tiny_tokenizer).eval()
    head, seqs, seen = output_head(model), varied_batch(), []
    head.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    with torch.no_grad(), running_in("bf16"):
        for fast in (True, False):
            logprobs(model, seqs, fast=fast)
        assert seen and set(seen) == {torch.float32}
        assert "forward" not in head.__dict__  # given back
        with precision_context():  # outside the seam's block the model's own forward is bf16
            assert response_logits(model, seqs).dtype == torch.bfloat16
