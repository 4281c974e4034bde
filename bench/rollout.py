"""Rollouts: rlhfkit's decoding loop vs plain Hugging Face `generate`, same model, same prompts.

Both decode the same left-padded batches of world prompts with a KV cache, stop each row at the
end-of-turn token and run under the same precision. Greedy decoding must give the same tokens
(checked: the script fails otherwise); sampled decoding is timed on the same prompts. Printed:
generated tokens per second of each and the ratio, per batch size.

    python bench/rollout.py --model smollm2-135m-instruct --batch-sizes 16 64 --precision bf16
    python bench/rollout.py --model tiny

Run on a quiet machine: both sides share it, in turn (ours, HF, ours, HF, ...), --repeats times
each. Printed: the median tokens/s of each side and the median of the pair-by-pair ratios, with
their range; alternating keeps the machine's drifts out of the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from rlhfkit.config import ModelConfig
from rlhfkit.data.tokenize import end_of_turn_id, left_pad, prompt_ids
from rlhfkit.data.world import World
from rlhfkit.models import load_model, load_tokenizer
from rlhfkit.precision import autocast
from rlhfkit.engines import Output
from rlhfkit.generation import as_generation, generate


def hf_generate(model, tokenizer, prompts, max_new_tokens, temperature, batch_size, precision):
    """The peer: `model.generate` on the same length-sorted batches rlhfkit builds."""
    stop = sorted({end_of_turn_id(tokenizer), tokenizer.eos_token_id} - {None})
    encoded = [prompt_ids(tokenizer, p) for p in prompts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    results = [None] * len(prompts)
    sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 else dict(do_sample=False)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        ids, mask = left_pad([encoded[i] for i in idx], tokenizer.pad_token_id)
        with torch.no_grad(), autocast(precision):
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                 eos_token_id=stop, pad_token_id=tokenizer.pad_token_id, **sampling)
        for row, i in zip(out[:, ids.shape[1] :].tolist(), idx):
            ends = [pos for pos, token in enumerate(row) if token in stop]  # HF pads after the first stop token
            kept = row[: ends[0] + 1] if ends else row
            results[i] = as_generation(Output(kept, bool(ends)), tokenizer)
    return results


def timed_pairs(ours, theirs, repeats):
    """Both sides in turn, ``repeats`` times: (our times, their times, our last output, theirs).
    Alternating keeps a drift in the machine's speed out of the ratio, taken pair by pair."""
    times, outputs = ([], []), [None, None]
    for _ in range(repeats):
        for side, fn in enumerate((ours, theirs)):
            start = time.perf_counter()
            outputs[side] = fn()
            times[side].append(time.perf_counter() - start)
    return times[0], times[1], outputs[0], outputs[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16])
    parser.add_argument("--batches", type=int, default=2, help="batches per measurement")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    tokenizer = load_tokenizer(args.model)
    model = load_model(ModelConfig(name=args.model), tokenizer, training=False).eval()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    print(f"model {args.model} on {device}, {args.precision}, max_new_tokens {args.max_new_tokens}, "
          f"temperature {args.temperature}, median of {args.repeats}")
    print(f"{'batch':>5} {'mode':>8} {'rlhfkit tok/s':>14} {'HF generate tok/s':>18} {'ratio (range)':>6}")
    for batch_size in args.batch_sizes:
        prompts = [p.messages for p in World(seed=0).prompts(batch_size * args.batches, "eval")]
        for mode, temperature in (("greedy", 0.0), ("sampled", args.temperature)):
            ours_s, theirs_s, ours, theirs = timed_pairs(
                lambda: generate(model, tokenizer, prompts, args.max_new_tokens, temperature, batch_size,
                                 args.precision, generator_seed=0),
                lambda: hf_generate(model, tokenizer, prompts, args.max_new_tokens, temperature, batch_size,
                                    args.precision), args.repeats)
            if mode == "greedy" and [g.token_ids for g in ours] != [g.token_ids for g in theirs]:
                same = sum(a.token_ids == b.token_ids for a, b in zip(ours, theirs))
                print(f"warning: greedy outputs differ on {len(prompts) - same}/{len(prompts)} prompts "
                      "(bf16 rounding can flip near-ties; fp32 must match exactly)")
                if args.precision == "fp32":
                    raise SystemExit("greedy outputs differ in fp32: the decoding loop is wrong")
            ours_tokens, theirs_tokens = sum(len(g.token_ids) for g in ours), sum(len(g.token_ids) for g in theirs)
            ratios = [(ours_tokens / a) / (theirs_tokens / b) for a, b in zip(ours_s, theirs_s)]
            print(f"{batch_size:>5} {mode:>8} {ours_tokens / statistics.median(ours_s):>14.1f} "
                  f"{theirs_tokens / statistics.median(theirs_s):>18.1f} {statistics.median(ratios):>5.2f}x "
                  f"({min(ratios):.2f}-{max(ratios):.2f})")


if __name__ == "__main__":
    main()
