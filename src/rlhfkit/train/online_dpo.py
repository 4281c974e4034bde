"""Online iterative DPO: the RLHFlow "Online RLHF" workflow (Dong et al. 2024, Xiong et al. 2024).

Each round, top to bottom: 1. take the round's fresh prompts, 2. sample N responses per prompt
from the current policy (batched), 3. score them with the reward (a reward model, the gold judge
or a function), 4. pair them (best vs worst by default), 5. train DPO on the pairs with the
round's starting model as the reference. The next round starts from the result. Each round is a
folder OUT/iter_<i> (its samples and pairs in data/, its model, metrics and checkpoints), so a
rerun with --run.resume skips finished rounds and resumes an interrupted one. At the end the
last round's model is copied to OUT and judged against the starting (SFT) model.
"""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from rlhfkit import processes
from rlhfkit.config import (
    BatchConfig,
    EvalConfig,
    ModelConfig,
    OptimConfig,
    PreferenceDataConfig,
    RolloutConfig,
    RunConfig,
    exact_div,
    require_positive,
)
from rlhfkit.data.records import Comparison, Message, Prompt
from rlhfkit.data.sources import gold_prompts, load_prompts, world_of
from rlhfkit.data.world import World
from rlhfkit.errors import ConfigError
from rlhfkit.eval.policy import PolicyEvaluator, remember_reference_answers
from rlhfkit.eval.scorers import reward_function
from rlhfkit.generation import SavedModelSampler, request_seeds
from rlhfkit.models import load_model, load_tokenizer
from rlhfkit.runs import MetricsLog, mark_complete
from rlhfkit.train import dpo
from rlhfkit.train.dpo import DPOAlgoConfig, DPOConfig
from rlhfkit.train.loop import begin_stage, stage


@dataclass
class OnlineAlgoConfig:
    """The RLHFlow "Online RLHF" loop: sample N, rank with the reward, best vs worst, DPO, repeat."""

    iterations: int = 3
    """Rounds of (sample -> score -> pair -> DPO); each starts from the previous round's model."""
    prompts_per_iteration: int = 256
    """Fresh prompts per round (round i uses the i-th slice of the training prompts)."""
    samples_per_prompt: int = 4
    """N responses sampled per prompt from the current policy."""
    pairing: Literal["best_worst", "best_random", "random"] = "best_worst"
    """Which two of the N become the pair: the highest vs the lowest reward, the highest vs a random
    lower one, or two random ones with different rewards (the higher is chosen)."""
    temperature: float = 1.0
    """Sampling temperature."""
    max_new_tokens: int = 48
    """Response length limit."""


@dataclass
class OnlineDPOConfig:
    """Online iterative DPO: each round's pairs come from the current policy, ranked by a reward."""

    recipe: str = ""
    """Recipe name or YAML path whose `online-dpo:` section fills these defaults."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The starting policy (usually the SFT output)."""
    reward: str = "gold"
    """Ranks the samples: a reward-model folder, `gold` (the world's gold judge), or `module:function`."""
    prompts: str = "world"
    """Training prompts: `world` or a file of prompt records."""
    world_seed: int = 0
    """Seed of the world's prompt generator."""
    max_seq_len: int = 256
    """Prompt + response tokens in DPO training."""
    online: OnlineAlgoConfig = field(default_factory=OnlineAlgoConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """Which engine samples each round (vLLM reads the round's model folder)."""
    dpo: DPOAlgoConfig = field(default_factory=DPOAlgoConfig)
    """The DPO loss of each round (its reference is the round's starting model; `pairs` is unused)."""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-6, warmup_steps=5))
    batch: BatchConfig = field(default_factory=lambda: BatchConfig(micro_batch_size=8))
    """micro_batch_size counts pairs."""
    run: RunConfig = field(default_factory=lambda: RunConfig(out="runs/online_dpo", steps=30, eval_every=0))
    """`steps` are DPO steps per round; each round is a folder OUT/iter_<i>."""
    eval: EvalConfig = field(default_factory=EvalConfig)

    def check(self) -> None:
        require_positive(self, "online.iterations", "online.prompts_per_iteration", "online.max_new_tokens",
                         "batch.micro_batch_size", "batch.grad_accum", "run.steps", "run.save_every", "max_seq_len",
                         "dpo.beta")
        if self.online.samples_per_prompt < 2:
            raise ConfigError(f"online.samples_per_prompt must be at least 2 to make a pair, got {self.online.samples_per_prompt}")
        if not 0.0 <= self.dpo.label_smoothing < 0.5:
            raise ConfigError(f"dpo.label_smoothing must be in [0, 0.5), got {self.dpo.label_smoothing}")
        self.rollout.check(lora=False)  # rounds sample from merged model folders, LoRA or not


MODEL_FILES = ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "chat_template.jinja")


def choose_pair(rewards: list[float], pairing: str, rng: random.Random) -> tuple[int, int] | None:
    """(chosen, rejected) indices among one prompt's N samples, or None when every reward is equal
    (a pair of equals teaches nothing). Ties for best/worst go to the earliest sample."""
    if max(rewards) == min(rewards):
        return None
    best = max(range(len(rewards)), key=lambda i: rewards[i])
    if pairing == "best_worst":
        return best, min(range(len(rewards)), key=lambda i: rewards[i])
    if pairing == "best_random":
        return best, rng.choice([i for i in range(len(rewards)) if rewards[i] < rewards[best]])
    return rng.choice([(i, j) for i in range(len(rewards)) for j in range(len(rewards)) if rewards[i] > rewards[j]])


def sample_round(cfg: OnlineDPOConfig, model_name: str, prompts: list[Prompt], score, seed: int,
                 say) -> list[dict]:
    """N samples per prompt from ``model_name``, their rewards, and the chosen pair's indices.
    Each process samples and scores its share of the prompts (one seed per answer); every process
    gets all rows."""
    n = cfg.online.samples_per_prompt
    tokenizer = load_tokenizer(model_name, cfg.model.trust_remote_code)
    say(f"sampling {n} responses for {len(prompts)} prompts from {model_name}"
        + (" with vLLM" if cfg.rollout.engine == "vllm" else ""))
    mine = processes.share(len(prompts))
    asked = [p for p in prompts[mine] for _ in range(n)]
    # the round's model is a folder: vLLM reads it (nothing to push)
    with SavedModelSampler(model_name, tokenizer, dataclasses.replace(cfg.model, lora=False), cfg.rollout,
                           cfg.eval.batch_size, seed=cfg.run.seed) as sampler:
        gens = sampler.generate([p.messages for p in asked], cfg.online.max_new_tokens, cfg.online.temperature,
                                request_seeds(seed, len(prompts) * n)[mine.start * n : mine.stop * n])
    texts = [g.text for g in gens]
    texts, rewards = processes.gather(texts), processes.gather(list(score(asked, texts)))
    rng = random.Random(seed)
    rows = []
    for i, prompt in enumerate(prompts):
        group, group_rewards = texts[i * n : (i + 1) * n], rewards[i * n : (i + 1) * n]
        rows.append({"prompt": [dataclasses.asdict(m) for m in prompt.messages], "meta": prompt.meta,
                     "responses": group, "rewards": group_rewards, "pair": choose_pair(group_rewards, cfg.online.pairing, rng)})
    return rows


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def write_rows(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)


def as_comparisons(rows: list[dict]) -> list[Comparison]:
    return [Comparison(messages(r["prompt"]), r["responses"][r["pair"][0]], r["responses"][r["pair"][1]])
            for r in rows if r["pair"] is not None]


def round_summary(rows: list[dict], world: World | None) -> dict[str, float]:
    """What the round's samples looked like: reward mean and spread, pairs made, and their gold."""
    rewards = [x for r in rows for x in r["rewards"]]
    metrics = {"online/reward_mean": sum(rewards) / len(rewards),
               "online/pairs": float(sum(r["pair"] is not None for r in rows)),
               "online/all_equal_fraction": sum(r["pair"] is None for r in rows) / len(rows)}
    if world is not None:
        prompts = [Prompt(messages(r["prompt"]), r["meta"]) for r in rows for _ in r["responses"]]
        gold = [s.score for s in world.judge_many(prompts, [t for r in rows for t in r["responses"]])]
        metrics["online/sample_gold"] = sum(gold) / len(gold)
    return metrics


def messages(dicts: list[dict]) -> tuple[Message, ...]:
    return tuple(Message(**m) for m in dicts)


@stage
def train(cfg: OnlineDPOConfig) -> Path:
    acc, out = begin_stage(cfg)
    exact_div(cfg.online.prompts_per_iteration, acc.num_processes, "online.prompts_per_iteration / processes")
    say, main = acc.print, acc.is_main_process
    world = world_of(cfg.prompts, cfg.world_seed)  # None for a prompts file: no gold judge
    prompts = load_prompts(cfg.prompts, cfg.online.iterations * cfg.online.prompts_per_iteration, "train",
                           cfg.world_seed, say)
    score = reward_function(cfg.reward, cfg.world_seed, cfg.model.precision, cfg.model.offload_frozen)
    log = MetricsLog(out, main)
    gold = gold_prompts(cfg.prompts, cfg.eval.gold_prompts, cfg.world_seed) if main else []

    def judge(model_path: str, step: int, final: bool, snapshot: bool = False) -> dict[str, float]:
        """Held-out greedy gold score of a round's model (and at the end, win rates against the
        starting model's answers, remembered in OUT/data before the first round); by the main
        process (the others have no prompts)."""
        if not gold:
            return {}
        tokenizer = load_tokenizer(model_path, cfg.model.trust_remote_code)
        policy = load_model(dataclasses.replace(cfg.model, lora=False), tokenizer, seed=cfg.run.seed, path=model_path)
        evaluator = PolicyEvaluator(policy, None, tokenizer, world, gold, cfg.eval.max_new_tokens,
                                    cfg.eval.batch_size, cfg.model.precision, cfg.online.temperature, say=say)
        remember_reference_answers(evaluator, out / "data" / "start_answers.json", resuming=not snapshot)
        return evaluator(step, final=final)

    start_metrics = judge(cfg.model.name, 0, final=False, snapshot=True)  # also remembers the start's answers
    if start_metrics and cfg.eval.at_start:
        log.log(0, start_metrics)
    model_name, step = cfg.model.name, 0
    for i in range(1, cfg.online.iterations + 1):
        folder = out / f"iter_{i}"
        # 1-4. The round's prompts, N samples each from the current policy, rewards, pairs (cached).
        first = (i - 1) * cfg.online.prompts_per_iteration
        chunk = [prompts[j % len(prompts)] for j in range(first, first + cfg.online.prompts_per_iteration)]
        samples = folder / "data" / "samples.jsonl"
        if not samples.exists():
            rows = sample_round(cfg, model_name, chunk, score, cfg.run.seed * 1000 + i, say)
            acc.wait_for_everyone()  # every process has seen that the file is missing
            if main:
                write_rows(rows, samples)
        acc.wait_for_everyone()
        rows = read_rows(samples)
        summary = round_summary(rows, world)
        say(f"round {i}: " + ", ".join(f"{k.split('/')[1]}={v:.3f}" for k, v in summary.items()))
        # 5. DPO on the round's pairs; its reference is the round's starting model. The stage
        # judges the rounds itself (below), so the DPO runs skip their own gold evaluation.
        round_cfg = DPOConfig(
            model=dataclasses.replace(cfg.model, name=model_name),
            data=PreferenceDataConfig(train=cfg.prompts, world_seed=cfg.world_seed,
                                      max_seq_len=cfg.max_seq_len),
            algo=cfg.dpo, optim=cfg.optim, batch=cfg.batch,
            run=dataclasses.replace(cfg.run, out=str(folder), resume=True, overwrite=False),
            eval=dataclasses.replace(cfg.eval, gold_prompts=0, at_start=False),
        )
        dpo.train(round_cfg, comparisons=(as_comparisons(rows), []))
        step += cfg.run.steps
        model_name = str(folder)
        judged = folder / "judged.json"  # a rerun does not judge finished rounds again
        if main:
            # A finished round is resumed from its model, never from its checkpoints, which hold the
            # optimizer state too (about 3x the model per checkpoint): free the disk.
            shutil.rmtree(folder / "checkpoints", ignore_errors=True)
            if not judged.exists():
                judged.write_text(json.dumps(judge(model_name, step, final=i == cfg.online.iterations)))
            log.log(step, {"online/iteration": float(i), **summary, **json.loads(judged.read_text())})
        acc.wait_for_everyone()

    # The last round's model is the result.
    if main:
        for name in MODEL_FILES:
            if (Path(model_name) / name).exists():
                shutil.copy2(Path(model_name) / name, out / name)
    log.close()
    if main:
        final = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
        mark_complete(out, {"stage": "online-dpo", "iterations": cfg.online.iterations, "steps": step,
                            **{k: v for k, v in final.items() if k.startswith("eval/")}})
    acc.wait_for_everyone()
    return out
