"""How much of a bf16 logprob is rounding, and what the fp32 LM head costs (issue 27).

On SmolLM2-135M-Instruct and world demonstrations, per response token:
- |logp under bf16 autocast - logp in fp32|, with the LM head in fp32 (rlhfkit's seam) and in bf16;
- the log-ratio after one small update (every weight moved by +-1e-5, an Adam step at lr 1e-5)
  as fp32 sees it, and the error bf16 adds to it: what PPO's ratio and KL terms are made of;
- forward + backward time with either head.

    python bench/logprob_rounding.py [--model smollm2-135m-instruct] [--prompts 32]
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch

from rlhfkit import logprobs as seam
from rlhfkit.config import ModelConfig
from rlhfkit.data.tokenize import tokenize_demonstration
from rlhfkit.data.world import World
from rlhfkit.models import SMOLLM2, load_model, load_tokenizer
from rlhfkit.records import join


@contextlib.contextmanager
def head_in_fp32(on: bool):
    """Off: the seam leaves the LM head as autocast runs it (bf16 logits), as before issue 27."""
    original = seam.fp32_logits
    if not on:
        seam.fp32_logits = lambda model: contextlib.nullcontext()
    try:
        yield
    finally:
        seam.fp32_logits = original


def logprobs_in(model, seqs, precision: str, fp32_head: bool = True) -> torch.Tensor:
    with seam.running_in(precision), torch.no_grad(), head_in_fp32(fp32_head):
        return seam.logprobs(model, seqs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=SMOLLM2)
    parser.add_argument("--prompts", type=int, default=32)
    args = parser.parse_args()
    tokenizer = load_tokenizer(args.model)
    model = load_model(ModelConfig(name=args.model, precision="fp32"), tokenizer).eval()
    demos = World(seed=0).demonstrations(args.prompts, imperfect=0.5)
    examples = [tokenize_demonstration(tokenizer, d, 512) for d in demos]
    seqs = join([e.prompt for e in examples], [e.response for e in examples], tokenizer.pad_token_id)
    mask = seqs.response_mask.bool()
    print(f"{args.model}: {args.prompts} demonstrations, {int(mask.sum())} response tokens")

    exact = logprobs_in(model, seqs, "fp32")
    before = {head: logprobs_in(model, seqs, "bf16", head) for head in (True, False)}
    for head, got in before.items():
        err = (got - exact).abs()[mask]
        print(f"|logp bf16 - fp32|, {'fp32' if head else 'bf16'} head: mean {err.mean():.4f}  max {err.max():.3f}")

    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator).sign() * 1e-5)
    true = (logprobs_in(model, seqs, "fp32") - exact)[mask]
    print(f"log-ratio after a 1e-5 step, fp32: mean |.| {true.abs().mean():.2e}")
    for head in (True, False):
        seen = (logprobs_in(model, seqs, "bf16", head) - before[head])[mask]
        err = (seen - true).abs()
        print(f"  as bf16 sees it, {'fp32' if head else 'bf16'} head: error mean {err.mean():.2e}  max {err.max():.3f}")

    for head in (False, True):
        times = []
        for _ in range(3):
            model.zero_grad()
            start = time.perf_counter()
            with seam.running_in("bf16"), head_in_fp32(head):
                seam.logprobs(model, seqs).sum().backward()
            times.append(time.perf_counter() - start)
        print(f"forward + backward, bf16, {'fp32' if head else 'bf16'} head: median {sorted(times)[1]:.2f} s")


if __name__ == "__main__":
    main()
