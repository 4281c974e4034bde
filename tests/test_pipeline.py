"""`rlhfkit run`: the whole recipe end to end on the tiny world, reruns, and the stage graph."""

import json
import shutil
from pathlib import Path

import pytest
import yaml

from rlhfkit.cli import parse
from rlhfkit.train.ppo import PPOConfig
from rlhfkit.errors import ConfigError, RlhfkitError
from rlhfkit.pipeline import make_plan, parse_overrides, run, stages
from tests.test_metrics import assert_documented


def test_run_tiny_beats_sft_under_the_gold_judge_and_writes_the_report(tiny_run):
    """The classic pipeline: a reward model initialised from the SFT policy, trained on simulated
    labelers' rankings of the policy's own samples mixed with synthetic candidates; PPO against it
    must beat SFT on the gold judge, which neither the RM nor PPO ever sees. (Without the
    candidates, an RM on policy samples only, PPO learned to stop refusing harmful requests and
    gold fell 0.32 -> 0.29.)"""
    info = json.loads((tiny_run / "pipeline.json").read_text())
    assert [s["name"] for s in info["stages"]] == ["sft", "labels", "rm", "ppo", "eval"]
    assert all(s["status"] == "done" and s["seconds"] > 0 for s in info["stages"])

    result = json.loads((tiny_run / "eval" / "eval.json").read_text())
    assert result["judge"] == "gold" and result["rl"] == "ppo" and list(result["models"]) == ["base", "sft", "ppo"]
    ppo, sft = result["models"]["ppo"], result["models"]["sft"]
    assert ppo["greedy"]["score"] > sft["greedy"]["score"] + 0.03, (ppo["greedy"], sft["greedy"])
    headline = next(r for r in result["win_rates"] if (r["model"], r["against"], r["decoding"]) == ("ppo", "sft", "greedy"))
    assert headline["win_rate"] > 0.55 and headline["low"] < headline["win_rate"] < headline["high"], headline
    assert ppo["kl_to_sft"] > 0
    sft_vs_base = next(r for r in result["win_rates"] if (r["model"], r["against"]) == ("sft", "base"))
    assert sft_vs_base["win_rate"] > 0.7  # the random base model gets little right (gold 0.08)

    html = (tiny_run / "report.html").read_text()
    assert html.count('src="data:image/png;base64,') >= 4
    pngs = sorted((tiny_run / "plots").glob("*.png"))
    assert len(pngs) >= 4 and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)


def test_a_rerun_skips_finished_stages_and_an_unfinished_one_resumes(tiny_run, tmp_path, capsys):
    """A copy of the finished run with the PPO stage marked unfinished and the evaluation gone:
    the rerun skips SFT, labels and RM, resumes PPO from its last checkpoint (step 20 of 30: none
    is written at the last step), trains the rest again, evaluates and gets the same numbers."""
    kept = sorted(p.name for p in (tiny_run / "ppo" / "checkpoints").glob("step-*"))
    assert kept == ["step-0000010", "step-0000020"]  # save_every 10, the last two, none at the last step
    copy = tmp_path / "tiny"
    shutil.copytree(tiny_run, copy)
    (copy / "ppo" / "complete.json").unlink()
    shutil.rmtree(copy / "eval")
    before = json.loads((tiny_run / "eval" / "eval.json").read_text())
    run(parse("run", ["tiny", "--runs-dir", str(tmp_path), "--name", "tiny", "--set", "pipeline.keep_checkpoints=true"]))
    printed = capsys.readouterr().out
    for stage in ("sft", "labels", "rm"):
        assert f"{stage}[/]" not in printed  # rich markup never leaks
        assert f": {stage} already complete" in printed
    assert "stage 4/5: ppo (resuming)" in printed and "resumed from" in printed
    after = json.loads((copy / "eval" / "eval.json").read_text())
    assert after["models"]["ppo"]["greedy"]["score"] == pytest.approx(before["models"]["ppo"]["greedy"]["score"])


@pytest.mark.parametrize("algo, flags", [
    ("dpo", ["dpo.data.world_prompts=24", "dpo.data.world_eval_prompts=4", "dpo.run.steps=2"]),
    ("grpo", ["grpo.run.steps=2", "grpo.algo.prompts_per_step=4"]),
    ("online-dpo", ["online-dpo.online.iterations=2", "online-dpo.online.prompts_per_iteration=8", "online-dpo.run.steps=2"]),
])
def test_every_algo_runs_in_the_pipeline_after_the_shared_stages(tiny_run, tmp_path, algo, flags):
    """--algo swaps the RL stage; SFT (and labels and RM where the algo needs them) are copied
    from the finished run, so they are skipped. Short runs: this checks the wiring, the learning
    tests check the algorithms."""
    root = tmp_path / "run"
    keep = ["sft"] if algo == "dpo" else ["sft", "labels", "rm"]
    for stage in keep:
        shutil.copytree(tiny_run / stage, root / stage)
    small = ["eval.prompts=8", f"{algo}.eval.gold_prompts=0", f"{algo}.eval.at_start=false", f"{algo}.run.save_every=1",
             *flags]
    out = run(parse("run", ["tiny", "--algo", algo, "--runs-dir", str(tmp_path), "--name", "run",
                            *[x for flag in small for x in ("--set", flag)]]))
    folder = algo.replace("-", "_")
    info = json.loads((out / "pipeline.json").read_text())
    expected = ["sft", "labels", folder, "eval"] if algo == "dpo" else ["sft", "labels", "rm", folder, "eval"]
    assert [s["folder"] for s in info["stages"]] == expected
    result = json.loads((out / "eval" / "eval.json").read_text())
    assert result["rl"] == folder and result["prompts"] == 8
    if algo == "dpo":  # DPO learns from the labels stage's rankings (of its own data section)
        labels = json.loads((out / "labels" / "complete.json").read_text())
        assert labels["train_rankings"] == 24 and (out / "dpo" / "data" / "train_rankings.jsonl").exists()
    assert (out / "report.html").exists()
    # A finished stage's resume checkpoints are deleted (the default); the final model stays.
    assert (out / folder / "complete.json").exists() and (out / folder / "model.safetensors").exists()
    assert not (out / folder / "checkpoints").exists()
    assert_documented(out)


def test_overrides_parse_as_yaml_and_bad_ones_say_what_is_wrong():
    assert parse_overrides(["ppo.run.steps=10", "ppo.optim.lr=1.0e-5", "eval.precision=bf16", "sft.model.lora=true"]) == {
        "ppo": {"run": {"steps": 10}, "optim": {"lr": 1e-5}}, "eval": {"precision": "bf16"}, "sft": {"model": {"lora": True}}}
    # YAML reads 1e-5 (no dot) as text; the config makes it the number the field is
    assert make_plan(parse("run", ["tiny", "--set", "ppo.optim.lr=1e-5"])).stage_config(PPOConfig, "ppo").optim.lr == 1e-5
    with pytest.raises(ConfigError, match="ppo.optim.lr: expected a number"):
        make_plan(parse("run", ["tiny", "--set", "ppo.optim.lr=fast"])).stage_config(PPOConfig, "ppo")
    for bad in ("ppo.run.steps", "steps=3", "ppo..steps=3"):
        with pytest.raises(ConfigError, match="SECTION.KEY=VALUE"):
            parse_overrides([bad])
    with pytest.raises(ConfigError, match="unknown section"):
        make_plan(parse("run", ["tiny", "--set", "ppp.run.steps=3"]))
    with pytest.raises(ConfigError, match="unknown key.*keep_checkpoint.*known: algo, stage_eval, keep_checkpoints"):
        make_plan(parse("run", ["tiny", "--set", "pipeline.keep_checkpoint=true"]))
    with pytest.raises(ConfigError, match="pipeline.keep_checkpoints must be true or false, got 'always'"):
        make_plan(parse("run", ["tiny", "--set", "pipeline.keep_checkpoints=always"]))
    with pytest.raises(ConfigError, match="unknown key 'stepz'"):
        stages(make_plan(parse("run", ["tiny", "--set", "ppo.run.stepz=3"])))[3].run(Path("/nonexistent"))


def test_repeated_set_flags_all_apply():
    cfg = parse("run", ["tiny", "--set", "ppo.run.steps=3", "--set", "eval.prompts=8"])
    assert cfg.set == ["ppo.run.steps=3", "eval.prompts=8"]
    plan = make_plan(cfg)
    assert plan.section("ppo")["run"]["steps"] == 3 and plan.section("eval")["prompts"] == 8
    assert plan.section("ppo")["run"]["save_every"] == 10  # the rest of the recipe's section stays


def test_plan_names_and_stage_graph():
    plan = make_plan(parse("run", ["tiny"]))
    assert plan.root == Path("runs/tiny") and plan.algo == "ppo" and plan.world
    assert [s.name for s in stages(plan)] == ["sft", "labels", "rm", "ppo", "eval"]
    dpo = make_plan(parse("run", ["tiny", "--algo", "dpo"]))
    assert dpo.root == Path("runs/tiny-dpo") and [s.name for s in stages(dpo)] == ["sft", "labels", "dpo", "eval"]
    assert make_plan(parse("run", [])).cfg.recipe == "smollm2"  # the default recipe


def test_wrong_labels_or_changed_settings_are_refused(tmp_path):
    with pytest.raises(RlhfkitError, match="no such file"):
        run(parse("run", ["tiny", "--labels", str(tmp_path / "missing.jsonl"), "--runs-dir", str(tmp_path)]))
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "run.yaml").write_text("recipe: tiny\nalgo: ppo\nlabels: simulated\nset: [ppo.run.steps=3]\n")
    with pytest.raises(RlhfkitError, match="--overwrite"):
        run(parse("run", ["tiny", "--runs-dir", str(tmp_path)]))


HH = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "hh-rlhf" / "helpful-base.jsonl.gz"


@pytest.mark.skipif(not HH.exists(), reason=f"hh-rlhf data not found at {HH}; the hh pipeline check needs it")
def test_hh_recipe_runs_sft_rm_dpo_and_judges_with_its_reward_model(tmp_path):
    """The hh recipe's stage graph on the tiny model: SFT on the chosen responses, an RM and DPO
    on the human comparisons, and an evaluation judged by the run's RM (hh has no gold judge)."""
    small = ["sft.model.name=tiny", "sft.model.precision=fp32", f"sft.data.train={HH}", "sft.run.steps=2",
             "sft.batch.micro_batch_size=2", "sft.data.eval_examples=4",
             f"rm.data.train={HH}", "rm.run.steps=2", "rm.data.max_examples=8", "rm.data.max_eval_examples=4",
             "rm.batch.micro_batch_size=2",
             f"dpo.data.train={HH}", "dpo.run.steps=2", "dpo.data.max_examples=8", "dpo.data.max_eval_examples=4",
             "dpo.batch.micro_batch_size=2", "eval.prompts=4", "eval.max_new_tokens=8", "eval.precision=fp32"]
    out = run(parse("run", ["hh", "--runs-dir", str(tmp_path), *[x for flag in small for x in ("--set", flag)]]))
    info = json.loads((out / "pipeline.json").read_text())
    assert [s["name"] for s in info["stages"]] == ["sft", "rm", "dpo", "eval"]
    result = json.loads((out / "eval" / "eval.json").read_text())
    assert result["judge"] == "rm" and result["prompts"] == 4 and list(result["models"]) == ["base", "sft", "dpo"]
    assert (out / "report.html").exists()
    for stage in ("sft", "rm", "dpo"):  # resume checkpoints deleted once each stage finished
        assert (out / stage / "complete.json").exists() and not (out / stage / "checkpoints").exists()


def test_human_labels_stop_after_sft_with_instructions_then_train_the_rm(tiny_run, tmp_path):
    """--labels human: with no rankings in the labelling database the run stops at the labels
    stage and says how to collect them (SFT kept); once labellers have ranked the SFT model's
    answers, the rerun exports them and the RM trains on exactly those rankings."""
    from rlhfkit.data.records import user
    from rlhfkit.label.store import NewTask, Store, Submission

    shutil.copytree(tiny_run / "sft", tmp_path / "run" / "sft")
    db = tmp_path / "labels.db"
    small = ["eval.prompts=8", "ppo.eval.gold_prompts=0", "ppo.eval.at_start=false", "ppo.run.steps=1",
             "ppo.algo.prompts_per_step=4", "ppo.algo.minibatch_size=4", "rm.run.steps=2"]
    args = ["tiny", "--labels", "human", "--labels-db", str(db), "--runs-dir", str(tmp_path), "--name", "run",
            *[x for flag in small for x in ("--set", flag)]]
    with pytest.raises(RlhfkitError, match="label serve --db .*labels.db --model .*run/sft"):
        run(parse("run", args))
    assert (tmp_path / "run" / "sft" / "complete.json").exists()
    assert not (tmp_path / "run" / "labels" / "complete.json").exists()

    store = Store(str(db))
    store.add_tasks(NewTask(f"t{i}", user(f"What is {i} + {i}?"), (f"{2 * i}", "I don't know", f"{i}"), "test")
                    for i in range(10))
    who = store.authenticate(store.add_labeller("ann")).labeller_id
    while (task := store.next_task(who)) is not None:
        store.submit(who, Submission(task.id, f"sub-task-{task.id}", "rank", (0, 2, 1), "", ""))
    out = run(parse("run", args))
    exported = json.loads((out / "labels" / "complete.json").read_text())
    assert exported["labeler"] == "human" and exported["rankings.jsonl"] == 10
    rm_config = yaml.safe_load((out / "rm" / "config.yaml").read_text())
    assert rm_config["data"]["train"] == str(out / "labels" / "rankings.jsonl")
    assert (out / "eval" / "eval.json").exists()


def test_finished_stages_with_the_same_settings_and_inputs_are_shared_between_runs(tiny_run, capsys):
    """`--algo grpo` beside the finished PPO run: SFT, labels and RM would be the same folders, so
    they are hard-linked from it, not trained again; a stage whose settings or inputs differ is not."""
    from rlhfkit.pipeline import shared_source

    small = ["eval.prompts=8", "grpo.eval.gold_prompts=0", "grpo.eval.at_start=false", "grpo.run.steps=1",
             "grpo.algo.prompts_per_step=4"]
    args = ["tiny", "--algo", "grpo", "--runs-dir", str(tiny_run.parent), "--name", "tiny-grpo-shared"]
    out = run(parse("run", [*args, *[x for flag in small for x in ("--set", flag)]]))
    try:
        printed = capsys.readouterr().out
        info = {s["name"]: s for s in json.loads((out / "pipeline.json").read_text())["stages"]}
        for stage in ("sft", "labels", "rm"):
            assert info[stage]["status"] == "shared" and info[stage]["shared_from"] == str(tiny_run / stage)
            assert f"{stage} shared from {tiny_run / stage}" in printed
        assert info["grpo"]["status"] == "done" and (out / "grpo" / "complete.json").exists()
        assert (out / "sft" / "model.safetensors").stat().st_ino == (tiny_run / "sft" / "model.safetensors").stat().st_ino
        assert yaml.safe_load((out / "sft" / "config.yaml").read_text())["run"]["out"] == str(out / "sft")
        assert not (out / "sft" / "checkpoints").exists() and (tiny_run / "sft" / "checkpoints").exists()

        # Other settings, or inputs from a stage that ran here: nothing to share.
        def source(extra: list[str], index: int, origins: dict) -> Path | None:
            plan = make_plan(parse("run", [*args[:-1], "other", *[x for f in [*small, *extra] for x in ("--set", f)]]))
            return shared_source(plan, stages(plan), index, origins)

        assert source([], 0, {}) is not None
        assert source(["sft.optim.lr=0.1"], 0, {}) is None
        assert source([], 2, {"sft": tiny_run.parent / "tiny", "labels": tiny_run.parent / "tiny"}) is not None
        assert source(["rm.run.steps=5"], 2, {"sft": tiny_run.parent / "tiny", "labels": tiny_run.parent / "tiny"}) is None
        assert source([], 2, {"sft": tiny_run.parent / "tiny", "labels": None}) is None  # labels sampled here
    finally:
        shutil.rmtree(out)


def test_a_set_value_that_is_not_yaml_is_a_clear_error():
    with pytest.raises(ConfigError, match=r"--set 'sft.model.name=\{a': the value is not valid YAML"):
        parse_overrides(["sft.model.name={a"])
