"""`precision: auto`: bf16 autocast or fp32, whichever trains this model faster on this machine.

bf16 autocast is no universal speed-up on CPUs: it halves a step on some and slows it many times
on others (bench/README.md, "Measurements behind the code's choices"). So `auto` measures: one
decoder layer of the model's width, forward and backward on a short batch, in fp32 and under bf16
autocast, on one thread. bf16 must win clearly (its rounding costs accuracy); the result is cached
per CPU, torch version and layer shape, so later commands only read it.
On CUDA, bf16 is chosen where the GPU supports it.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from rlhfkit.errors import ConfigError

PRECISIONS = ("auto", "fp32", "bf16")
ENV = "RLHFKIT_PRECISION"  # fixes what `auto` resolves to, without measuring (CI, clusters)
BF16_MUST_TAKE = 0.8  # of the fp32 time: a smaller gain is not worth bf16's rounding


@dataclass(frozen=True)
class LayerShape:
    """The widths that set a decoder layer's cost."""

    hidden: int
    intermediate: int
    heads: int
    kv_heads: int

    @property
    def text(self) -> str:
        return f"{self.hidden}x{self.intermediate}"


SMOLLM2_SHAPE = LayerShape(576, 1536, 9, 3)  # before its folder exists (converted on first load)
TINY_SHAPE = LayerShape(128, 352, 4, 4)
DEFAULT_SHAPE = LayerShape(1024, 4096, 16, 16)  # a hub model whose config cannot be read here


@dataclass(frozen=True)
class Choice:
    precision: str  # "fp32" or "bf16"
    why: str  # one line: what was measured or what decided it
    fp32_ms: float | None = None
    bf16_ms: float | None = None
    quiet: bool = False  # nothing to announce


def choose(fp32_s: float, bf16_s: float | None) -> str:
    """bf16 only when its forward+backward takes under ``BF16_MUST_TAKE`` of fp32's time
    (``bf16_s`` None: bf16 autocast failed on this machine)."""
    return "bf16" if bf16_s is not None and bf16_s < BF16_MUST_TAKE * fp32_s else "fp32"


def layer_shape(model: str) -> LayerShape:
    """The decoder-layer widths of a model name (built-in, local folder or hub id)."""
    from rlhfkit.models import SMOLLM2, TINY, cache_dir

    if model == TINY:
        return TINY_SHAPE
    folder = cache_dir() / "models" / SMOLLM2 if model == SMOLLM2 else Path(model).expanduser()
    config: dict = {}
    for name in ("config.json", "adapter_config.json"):
        path = folder / name
        if path.is_file():
            try:
                config = json.loads(path.read_text())
            except (OSError, ValueError):
                config = {}
            break
    if "base_model_name_or_path" in config and "hidden_size" not in config:  # a PEFT adapter
        return layer_shape(config["base_model_name_or_path"])
    if not config and model == SMOLLM2:
        return SMOLLM2_SHAPE
    if not config and not folder.exists():  # a hub id: its config.json if already downloaded, no network
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(model, "config.json")
            config = json.loads(Path(cached).read_text()) if isinstance(cached, str) else {}
        except Exception:  # not a valid id, or an unreadable file: the load that follows says why
            config = {}
        if not config:
            return DEFAULT_SHAPE
    config = config.get("text_config", config)
    hidden = config.get("hidden_size") or config.get("n_embd") or config.get("d_model")
    if not hidden:
        return DEFAULT_SHAPE
    intermediate = config.get("intermediate_size") or config.get("n_inner") or config.get("ffn_dim") or 4 * hidden
    heads = config.get("num_attention_heads") or config.get("n_head") or max(1, hidden // 64)
    heads = heads if hidden % heads == 0 else 1
    kv = config.get("num_key_value_heads") or heads
    return LayerShape(int(hidden), int(intermediate), int(heads), int(kv if heads % kv == 0 else heads))


def measure(shape: LayerShape, tokens: int = 128, min_reps: int = 3, max_reps: int = 20,
            min_seconds: float = 0.3) -> tuple[float, float | None]:
    """Seconds of one forward+backward of a one-layer Llama of ``shape`` over ``tokens`` tokens:
    (fp32, bf16 autocast), the best of several passes each, alternating so a busy machine slows
    both; short passes (small models) repeat until each side has run ``min_seconds``. bf16 is
    None where autocast fails. On one thread: the ratio is the instruction set's, and threads
    waiting on each other on a shared machine make several-thread timings slow and noisy.
    Leaves the global RNG and the thread count as it found them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _measure(shape, tokens, min_reps, max_reps, min_seconds)
    finally:
        torch.set_num_threads(threads)


def _measure(shape: LayerShape, tokens: int, min_reps: int, max_reps: int, min_seconds: float) -> tuple[float, float | None]:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=2048, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                         num_hidden_layers=1, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
                         max_position_embeddings=max(tokens, 64))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
        ids = torch.randint(0, config.vocab_size, (2, tokens // 2))

    def once(context) -> float:
        start = time.perf_counter()
        with context:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    def bf16():
        return torch.autocast("cpu", dtype=torch.bfloat16)

    once(contextlib.nullcontext())
    try:
        once(bf16())
    except RuntimeError:  # a CPU or build whose bf16 kernels refuse: fp32 it is
        return min(once(contextlib.nullcontext()) for _ in range(min_reps)), None
    fp32, bf16_times = [], []
    while len(fp32) < max_reps:
        fp32.append(once(contextlib.nullcontext()))
        bf16_times.append(once(bf16()))
        if min(bf16_times) > 3 * max(fp32) or max(bf16_times) * 3 < min(fp32):
            break  # a clear answer: no need to spend more (bf16 can take seconds per pass)
        if len(fp32) >= min_reps and min(sum(fp32), sum(bf16_times)) >= min_seconds:
            break
    return min(fp32), min(bf16_times)


def machine_key(shape: LayerShape) -> str:
    """What the measurement depends on: the CPU (vendor, family, model, flags), torch and the
    layer widths."""
    cpu = ""
    with contextlib.suppress(OSError):
        info = Path("/proc/cpuinfo").read_text().split("\n\n")[0]
        fields = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in info.splitlines() if ":" in line)}
        cpu = "|".join(fields.get(k, "") for k in ("vendor_id", "cpu family", "model", "model name"))
        cpu += "|flags " + hashlib.sha1(fields.get("flags", "").encode()).hexdigest()[:12]
    return f"{cpu}|torch {torch.__version__}|{shape.text}"


def cache_file() -> Path:
    from rlhfkit.models import cache_dir

    return cache_dir() / "precision.json"


def _read_cache() -> dict:
    try:
        return json.loads(cache_file().read_text())
    except (OSError, ValueError):
        return {}


def _write_cache(key: str, choice: Choice) -> None:
    """Best effort: a read-only cache folder means measuring again next time, nothing worse."""
    with contextlib.suppress(OSError):
        path = cache_file()
        path.parent.mkdir(parents=True, exist_ok=True)
        entries = {**_read_cache(), key: asdict(choice)}
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(entries, indent=1))
        os.replace(tmp, path)


@functools.cache
def auto_choice(shape: LayerShape) -> Choice:
    """What `auto` means for a layer of ``shape`` here: from RLHFKIT_PRECISION, the GPU, the
    cache, or a measurement (then cached)."""
    forced = os.environ.get(ENV, "")
    if forced:
        if forced not in ("fp32", "bf16"):
            raise ConfigError(f"{ENV}={forced!r}: expected fp32 or bf16 (it fixes what `precision: auto` means)")
        return Choice(forced, f"set by {ENV}", quiet=True)  # the user chose: as silent as a flag
    if torch.cuda.is_available():
        if torch.cuda.is_bf16_supported():
            return Choice("bf16", f"{torch.cuda.get_device_name()} supports bf16")
        return Choice("fp32", f"{torch.cuda.get_device_name()} has no bf16")
    key = machine_key(shape)
    cached = _read_cache().get(key)
    if cached:
        with contextlib.suppress(TypeError):
            return Choice(**{**cached, "why": cached["why"].replace("measured", "measured earlier", 1)})
    busy = busy_machine_warning(threads=2) is not None  # before measuring: our own load is not others'
    fp32_s, bf16_s = measure(shape)
    precision = choose(fp32_s, bf16_s)
    bf16_text = f"{1000 * bf16_s:.0f} ms in bf16 autocast" if bf16_s is not None else "bf16 autocast failed"
    kept = "not cached: the machine is busy, so it is measured again next time" if busy else f"cached in {cache_file()}"
    why = f"measured one {shape.text} layer's forward+backward on one thread: {1000 * fp32_s:.0f} ms in fp32, {bf16_text}; {kept}"
    choice = Choice(precision, why, round(1000 * fp32_s, 2), None if bf16_s is None else round(1000 * bf16_s, 2))
    if not busy:
        _write_cache(key, choice)
    return choice


def to_stderr(text: str) -> None:
    """Diagnostics go to stderr: stdout is the answer stream of `chat` and what scripts read."""
    print(text, file=sys.stderr, flush=True)


def resolve(precision: str, model: str, say: Callable[[str], None] | None = to_stderr,
            flag: str = "--model.precision") -> str:
    """``precision`` as "fp32" or "bf16": explicit settings pass through, `auto` is decided for
    ``model`` on this machine and announced with ``say`` (None: silently), naming the ``flag``
    that overrides it."""
    if precision in ("fp32", "bf16"):
        return precision
    if precision != "auto":
        raise ConfigError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    from rlhfkit.models import check_model_name

    check_model_name(model)  # a mistyped folder is said at once, not after the measurement
    choice = auto_choice(layer_shape(model))
    if say and not choice.quiet:
        say(f"precision auto -> {choice.precision} ({choice.why}; set {flag} to fp32 or bf16 to choose)")
    return choice.precision


def busy_machine_warning(threads: int | None = None) -> str | None:
    """A warning when other work already fills the CPU cores and torch runs several threads
    (``threads``, default torch's): they then wait on each other at every operation (bench/README.md,
    "Measurements behind the code's choices")."""
    if torch.cuda.is_available() or not hasattr(os, "getloadavg"):
        return None
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    threads = torch.get_num_threads() if threads is None else threads
    if threads < 2 or load < cores + 0.5:
        return None
    return (f"this machine is busy (load {load:.1f} on {cores} cores) and torch runs {threads} threads, which then "
            f"wait on each other: on a loaded 2-core machine 1 thread was 6-8x faster than 2. "
            f"Start with OMP_NUM_THREADS=1 (or fewer threads than idle cores) while the machine is shared")


def autocast(precision: str):
    """bf16 autocast on the model's device when asked; a no-op context otherwise."""
    if precision not in ("fp32", "bf16"):  # `auto` is decided at a command's start (rlhfkit.precision)
        raise ValueError(f"precision {precision!r}: resolve `auto` with rlhfkit.precision.resolve first")
    if precision == "bf16":
        return torch.autocast("cpu" if not torch.cuda.is_available() else "cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
