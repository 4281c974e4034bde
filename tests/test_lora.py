"""LoRA: the merged model folder plus its PEFT adapter in ``adapter/``, and the target modules."""

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from rlhfkit.cli import parse
from rlhfkit.errors import ConfigError
from rlhfkit.models import apply_lora, build_tiny_model, save_model
from rlhfkit.train import rm, sft

# A few steps at a high rate, so the adapters (B starts at zero) move the model measurably.
SMALL = ["--model.lora", "--run.steps", "3", "--optim.lr", "1e-2", "--optim.warmup-steps", "0",
         "--batch.micro-batch-size", "4"]
TOKENS = torch.tensor([[5, 60, 7, 300, 42, 9, 120, 33, 1, 77]])


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_tokenizer) -> Path:
    """The tiny model as a plain folder: a base that transformers itself can load."""
    folder = tmp_path_factory.mktemp("base") / "tiny"
    build_tiny_model(tiny_tokenizer).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


def logits(model, tokens=TOKENS) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits


def test_sft_saves_the_merged_model_and_an_adapter_that_rebuilds_it(base, tmp_path):
    out = sft.train(parse("sft", [*SMALL, "--eval.gold-prompts", "0", "--eval.no-at-start", "--data.world-examples", "32",
                                  "--data.eval-examples", "4", "--model.name", str(base), "--run.out", str(tmp_path / "sft")]))
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base)
    assert not (out / "adapter_config.json").exists()  # transformers would load base + adapter instead
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert not hasattr(merged, "peft_config")
    rebuilt = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"]),
                                        out / "adapter")
    want, got = logits(merged), logits(rebuilt)
    # fp32: merged W + BA vs W x + B(A x) differ only by rounding, ~1e-7 of the logit scale
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    base_logits = logits(AutoModelForCausalLM.from_pretrained(base))
    assert (want - base_logits).abs().max() > 1e-2 * want.abs().max()  # the adapter did move the model


def test_rm_adapter_carries_the_trained_head(base, tmp_path):
    out = rm.train(parse("rm", [*SMALL, "--model.name", str(base), "--data.responses", "candidates",
                                "--data.world-prompts", "16", "--data.world-eval-prompts", "4", "--norm-examples", "8",
                                "--run.out", str(tmp_path / "rm")]))
    assert any(".score." in key for key in load_file(out / "adapter" / "adapter_model.safetensors"))
    merged = AutoModelForSequenceClassification.from_pretrained(out)
    fresh_head = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)
    rebuilt = PeftModel.from_pretrained(fresh_head, out / "adapter")
    want, got = logits(merged), logits(rebuilt)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_target_modules_from_the_flag_and_a_recipe_adapt_only_those_layers(tiny_tokenizer, tmp_path):
    flag = parse("sft", ["--model.lora", "--model.lora-target-modules", "q_proj", "v_proj"])
    (tmp_path / "r.yaml").write_text("sft:\n  model:\n    lora: true\n    lora_target_modules: [q_proj, v_proj]\n")
    recipe = parse("sft", ["--recipe", str(tmp_path / "r.yaml")])
    assert flag.model.lora_target_modules == recipe.model.lora_target_modules == ["q_proj", "v_proj"]
    assert parse("sft", []).model.lora_target_modules == ["all-linear"]
    model = apply_lora(build_tiny_model(tiny_tokenizer), flag.model)
    save_model(model, tiny_tokenizer, tmp_path / "out")
    keys = load_file(tmp_path / "out" / "adapter" / "adapter_model.safetensors")
    config = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "tiny"  # the built-in, which has no folder
    adapted = {key.split(".lora_")[0].rsplit(".", 1)[-1] for key in keys}
    assert adapted == {"q_proj", "v_proj"} and len(keys) == 2 * 2 * 4  # A and B, 2 layers, 4 blocks


def test_all_linear_default_adapts_every_linear_layer_but_the_head(tiny_tokenizer):
    model = apply_lora(build_tiny_model(tiny_tokenizer), parse("sft", ["--model.lora"]).model)
    adapted = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if hasattr(m, "lora_A")}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


@pytest.mark.parametrize("names", [["q_proj", "qkv"], ["self_attn"], ["all-linear", "q_proj"], []])
def test_a_target_module_the_model_lacks_is_one_clear_error(tiny_tokenizer, names):
    cfg = parse("sft", ["--model.lora"]).model
    cfg.lora_target_modules = names
    with pytest.raises(ConfigError, match="--model.lora-target-modules") as info:
        apply_lora(build_tiny_model(tiny_tokenizer), cfg)
    message = str(info.value)
    assert "\n" not in message
    if names in (["q_proj", "qkv"], ["self_attn"]):
        assert names[-1] in message and "q_proj" not in message.split("(")[0] and "down_proj" in message
