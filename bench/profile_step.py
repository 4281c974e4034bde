"""Profile one training forward+backward of a policy on a PPO-like minibatch (no peer, no ratio).

The profile behind the packing decisions in bench/README.md: where a step's time goes (op table
from torch.profiler, grouped by input shape), how the packed rows are laid out, and how many
minor page faults and how much system time a step costs.

    python bench/profile_step.py --model smollm2-135m-instruct
    python bench/profile_step.py --model runs/smollm2/sft --prompts 16 --answer-tokens 30 --profile

Answers are the world's demonstrations padded with a fixed chatty sentence and cut to
``--answer-tokens``, so lengths resemble PPO rollouts; bf16 autocast, eager attention (what
rlhfkit trains with on CPU).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct", help="built-in name or model folder")
    p.add_argument("--prompts", type=int, default=8, help="sequences in the minibatch")
    p.add_argument("--answer-tokens", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--profile", action="store_true", help="also print torch.profiler's op table")
    args = p.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhfkit.data.tokenize import prompt_ids
    from rlhfkit.data.world import World, demonstrate
    from rlhfkit.models import resolve
    from rlhfkit.fast.packing import pack
    from rlhfkit.logprobs import logprobs
    from rlhfkit.records import join

    path = resolve(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=torch.float32)
    prompts = World(0).prompts(args.prompts, "train")
    chatty = " Let me know if you need anything else! I hope this helps you today."
    answers = [tokenizer(demonstrate(q) + chatty, add_special_tokens=False).input_ids[: args.answer_tokens]
               for q in prompts]
    seqs = join([prompt_ids(tokenizer, q.messages) for q in prompts], answers, tokenizer.pad_token_id)
    real = [ids[mask.bool()] for ids, mask in zip(seqs.input_ids, seqs.attention_mask)]
    rows = pack(real, 0, share_prefixes=True).input_ids.shape
    print(f"{len(real)} sequences, {sum(map(len, real))} tokens -> packed rows {tuple(rows)} "
          f"({rows[0] * rows[1]} positions)")

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logp = logprobs(model, seqs, 1.0)
        (-logp.sum()).backward()
        model.zero_grad(set_to_none=True)

    step()
    step()
    times, before = [], resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(args.repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    after = resource.getrusage(resource.RUSAGE_SELF)
    print(f"forward+backward: median {statistics.median(times):.3f} s, min {min(times):.3f} s "
          f"({torch.get_num_threads()} threads); per step {(after.ru_minflt - before.ru_minflt) / args.repeats:.0f} "
          f"minor page faults, {(after.ru_stime - before.ru_stime) / args.repeats:.3f} s system time")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            step()
        print(prof.key_averages(group_by_input_shape=True).table(
            sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=30, max_shapes_column_width=60))


if __name__ == "__main__":
    main()
