#!/usr/bin/env bash
# The GPU checks, prepared for one short session on a lent single-GPU machine. From the repository root:
#
#     OUT=/some/folder bash benchmarks/device_check.sh      # logs and JSON go to $OUT (default ./device_check_out)
#
# Steps, most important first, each under its own time limit (a failed step does not stop the next):
#   env      GPU, torch, timm; timm_posattn imports and registers its models
#   grads    CUDA fp32 and bf16-autocast training step of vit_posattn_small_patch16_224: the memory-saving
#            recompute path gives the same loss and gradients as plain autograd
#   eager    bf16 benchmark vs timm's vit_small_patch16_224 at batch 256 (benchmark issue target: train >= 1.15)
#   layout   how the shared attention matrix is applied, on the GPU (benchmarks/attention_layout.py), then the
#            whole attention modules, including the copy-free channels-first layout (--projections)
#   train    train.py on CUDA with bf16 AMP, 1 epoch of the structured demo (DDP over NCCL needs >= 2 GPUs:
#            with one GPU this checks the CUDA/AMP training path, not NCCL)
#   compile  the bf16 training benchmark with torch.compile (slowest: compiles both models)
# The whole script stops within BUDGET seconds (default 540, under the device tool's 10-minute command limit): each
# step's limit is cut to what is left, and a step with under 20 s left is skipped. The machine needs torch and
# timm >= 1.0.31 installed; nothing is installed here. $OUT/summary.txt lists each step's exit status and seconds.
# DEVICE=cpu runs the env and grads steps on the CPU (a dry run of the script).
set -u
OUT=${OUT:-device_check_out}
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
BUDGET=${BUDGET:-540}
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" DEVICE
mkdir -p "$OUT"

step() {  # step NAME SECONDS CMD...: run CMD under a time limit, log to $OUT/NAME.log, record status and time
    local name=$1 limit=$2 start rc left=$((BUDGET - SECONDS))
    shift 2
    if [ "$left" -lt 20 ]; then
        echo "$name skipped: ${left}s of the ${BUDGET}s budget left" | tee -a "$OUT/summary.txt"
        return
    fi
    [ "$limit" -le "$left" ] || limit=$left
    echo "== $name (limit ${limit}s)"
    start=$(date +%s)
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    echo "$name rc=$rc $(($(date +%s) - start))s" | tee -a "$OUT/summary.txt"
    tail -n 20 "$OUT/$name.log"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$OUT/nvidia-smi.txt" 2>&1

step env 60 "$PY" - <<'PYTHON'
import torch, timm, timm_posattn  # noqa: F401
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'timm', timm.__version__)
if torch.cuda.is_available():
    print(torch.cuda.get_device_name(), 'bf16:', torch.cuda.is_bf16_supported())
print(len(timm.list_models('vit_posattn*')), 'vit_posattn models registered')
PYTHON

step grads 90 "$PY" - <<'PYTHON'
import contextlib
import os

import torch
import timm
import timm_posattn  # noqa: F401

device = os.environ['DEVICE']
torch.manual_seed(0)
model = timm.create_model('vit_posattn_small_patch16_224').to(device).train()
batch = 16 if device == 'cuda' else 2
x, y = torch.randn(batch, 3, 224, 224, device=device), torch.randint(0, 1000, (batch,), device=device)
for dtype in (None, torch.bfloat16):
    results = {}
    for recompute in (False, True):
        for blk in model.blocks:
            blk.attn.recompute_attn_out = recompute
        model.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=dtype) if dtype else contextlib.nullcontext():
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        results[recompute] = (loss.item(), [p.grad.float().clone() for p in model.parameters() if p.grad is not None])
    (loss0, grads0), (loss1, grads1) = results[False], results[True]
    rel = max(((a - b).norm() / a.norm().clamp_min(1e-12)).item() for a, b in zip(grads0, grads1))
    print(f'{dtype or torch.float32}: loss {loss0:.6f} vs {loss1:.6f}, max relative grad difference {rel:.2e}')
    assert len(grads0) == len(grads1) and abs(loss0 - loss1) <= 1e-3 * abs(loss0), 'recompute path differs'
    assert rel < (1e-4 if dtype is None else 5e-2), 'recompute path gradients differ'
print('grads OK')
PYTHON

[ "$DEVICE" = cuda ] || { cat "$OUT/summary.txt"; exit 0; }

step eager 180 "$PY" benchmarks/throughput.py --device cuda --dtype bfloat16 --batch-size 256 \
    --models vit_posattn_small_patch16_224 --json "$OUT/bf16_eager.json"

step layout 60 "$PY" benchmarks/attention_layout.py --device cuda --dtype bfloat16 -b 256 --json "$OUT/layout.json"

step layout_modules 60 "$PY" benchmarks/attention_layout.py --device cuda --dtype bfloat16 -b 256 --projections \
    --json "$OUT/layout_modules.json"

step train 150 "$PY" train.py --device cuda --amp --amp-dtype bfloat16 --epochs 1 --output "$OUT" \
    --experiment cuda_bf16 --no-attention-plot

step compile 300 "$PY" benchmarks/throughput.py --device cuda --dtype bfloat16 --batch-size 256 --compile \
    --modes train --models vit_posattn_small_patch16_224 --json "$OUT/bf16_compile.json"

cat "$OUT/summary.txt"
