"""Model names given by the user: a missing or unfinished local folder is said to be one, by name,
instead of transformers' "Repo id must be in the form ..."; a hub id that the hub does not give
says so, in one line."""

import pytest

from cli_errors import refused
from rlhfkit.errors import RlhfkitError
from rlhfkit.models import check_model_name, could_be_hub_id

HUB_FAILED = "is not a local folder, and loading it from the Hugging Face hub failed: "


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """A working folder with a run of stages in it: runs/tiny/{sft (a model), ppo (unfinished)}."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "tiny" / "sft").mkdir(parents=True)
    (tmp_path / "runs" / "tiny" / "sft" / "config.json").write_text("{}")
    (tmp_path / "runs" / "tiny" / "ppo" / "checkpoints" / "step-2").mkdir(parents=True)
    return tmp_path


@pytest.fixture
def offline(monkeypatch):
    """No network here: the hub is asked offline, so a hub id fails at once instead of retrying."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_chat_with_a_missing_run_folder_says_it_does_not_exist(in_tmp, capsys):
    line = refused(["chat", "runs/nope/ppo"], capsys)
    assert line == "rlhfkit chat: error: runs/nope/ppo: no such folder (runs has no nope; it has tiny)"


def test_sft_with_a_missing_relative_folder_says_it_does_not_exist(in_tmp, capsys):
    line = refused(["sft", "--model.name", "./missing", "--run.out", "out"], capsys)
    assert line.startswith("rlhfkit sft: error: ./missing: no such folder (nor a built-in name: tiny"), line
    assert not (in_tmp / "out").exists()  # refused before the run folder was made


def test_a_hub_id_the_hub_does_not_give_says_both(in_tmp, offline, capsys):
    line = refused(["chat", "someone/some-model"], capsys)
    assert line.startswith(f"rlhfkit chat: error: someone/some-model {HUB_FAILED}"), line
    assert "offline" in line or "connect" in line  # transformers' reason, kept


def test_reward_model_hub_id_the_hub_does_not_give_says_both(in_tmp, offline, capsys):
    line = refused(["rm", "score", "--model", "someone/some-rm", "--input", "x.jsonl"], capsys)
    assert line.startswith(f"rlhfkit rm score: error: someone/some-rm {HUB_FAILED}"), line


def test_eval_refuses_a_missing_against_model_before_answering(in_tmp, capsys):
    line = refused(["eval", "--model", "tiny", "--against", "runs/tiny/dpo"], capsys)
    assert line == "rlhfkit eval: error: runs/tiny/dpo: no such folder (runs/tiny has no dpo; it has ppo, sft)"


def test_eval_names_the_models_inside_a_run_folder_given_as_reward_model(in_tmp, capsys):
    line = refused(["eval", "--model", "tiny", "--judge", "rm", "--rm", "runs/tiny"], capsys)
    assert line.endswith("runs/tiny: not a reward model folder (no config.json); the models in it: runs/tiny/sft")


def test_label_serve_refuses_a_missing_model_before_generating_in_the_background(in_tmp, capsys):
    (in_tmp / "prompts.jsonl").write_text('{"prompt": "hi"}\n')
    line = refused(["label", "serve", "--model", "runs/x", "--prompts", "prompts.jsonl", "--db", "l.db"], capsys)
    assert line.endswith("runs/x: no such folder (runs has no x; it has tiny)")


def test_an_unfinished_stage_folder_says_so(in_tmp):
    with pytest.raises(RlhfkitError, match=r"^runs/tiny/ppo: an unfinished run \(checkpoints/ but no complete.json"):
        check_model_name("runs/tiny/ppo")
    (in_tmp / "runs" / "tiny" / "ppo" / "complete.json").write_text("{}")  # finished, yet no model in it
    with pytest.raises(RlhfkitError, match=r"^runs/tiny/ppo: not a model folder \(no config.json\)$"):
        check_model_name("runs/tiny/ppo")


def test_a_file_is_not_a_model_folder(in_tmp):
    (in_tmp / "model.safetensors").write_text("")
    with pytest.raises(RlhfkitError, match="model.safetensors: not a model folder but a file"):
        check_model_name("model.safetensors")


@pytest.mark.parametrize("name", ["tiny", "smollm2-135m-instruct", "runs/tiny/sft", "gpt2", "someone/model"])
def test_accepted_names(in_tmp, name):
    check_model_name(name)  # built-in, a model folder, hub ids: nothing loaded, nothing converted


@pytest.mark.parametrize("name, hub", [
    ("gpt2", True), ("HuggingFaceTB/SmolLM2-135M-Instruct", True),
    ("runs/x", False),  # runs/ is a local folder: a path
    ("a/b/c", False), ("./m", False), ("../m", False), (".m", False), ("/abs/m", False), ("~/m", False),
    ("owner/", False), ("my model", False), ("a--b", False),
])
def test_could_be_hub_id(in_tmp, name, hub):
    assert could_be_hub_id(name) is hub
