#!/usr/bin/env bash
# The GPU checks, prepared for one short session on a lent single-GPU machine. From the repository root:
#
#     OUT=/some/folder bash benchmarks/device_check.sh      # logs and JSON go to $OUT (default ./device_check_out)
#
# Steps, most important first, each under its own time limit (a failed step does not stop the next):
#   env      GPU, torch, timm; timm_posattn imports and registers its models
#   grads    CUDA fp32 and bf16-autocast training step of vit_posattn_small_patch16_224: the memory-lean operators
#            (timm_posattn.lean_attention: A rebuilt from q and k, A·V and norm1 recomputed in backward) give plain
#            autograd's loss and gradients (lean=False), eagerly and inside a torch.compile(fullgraph=True) graph
#            (inductor; a 2-block copy, to compile quickly); without autograd, the head-by-head and batch-1 (SDPA)
#            forwards and the reparameterized model give the plain forward's logits
#   sweep    bf16 benchmark vs timm's ViT-S/16 at 224, 384 and 512 px: inference at batch 1, 32 and 256 with the
#            reparameterized model at 1 and 256, training at batch 64 (--plot: the ratio against N)
#   compiled the same comparison with both models compiled by inductor (--compile), bf16, at 224 and 384 px:
#            inference and training at batch 256 (the compiled rows: speed, peak memory, compile seconds)
#   eager    bf16 training benchmark at 224, batch 256 (benchmark issue target: train >= 1.15)
#   layout   how the shared attention matrix is applied, on the GPU (benchmarks/attention_layout.py), then the
#            whole attention modules, including the copy-free channels-first layout (--projections)
#   distill  what a distillation step costs against a plain training step of the converted ViT-S/16 (bf16, batch
#            128): the ImageNet recipe's cost ratio (configs/imagenet_convert_small.yaml)
#   train    train.py on CUDA with bf16 AMP, 1 epoch of the structured demo (DDP over NCCL needs >= 2 GPUs:
#            with one GPU this checks the CUDA/AMP training path, not NCCL)
#   fmnist   (not in the default STEPS: a call of its own) the Fashion-MNIST comparison of docs/real_images.md
#            (benchmarks/fashion_mnist.sh): qk, tied, the standard twin and timm's ViT, 10 epochs each, on the GPU,
#            then the table. The four .gz files (30 MB) travel with the checkout: copy them into a git-ignored
#            folder and carry it, e.g. `mkdir -p .device_data/fashion-mnist && cp /usr/share/datasets/fashion-mnist/*.gz
#            .device_data/fashion-mnist/`, carry ".device_data", and run `STEPS="env fmnist" bash
#            benchmarks/device_check.sh` (FMNIST= names another folder)
# STEPS chooses the steps (default: every one above but fmnist), e.g. STEPS="env grads compiled".
# The whole script stops within BUDGET seconds (default 540, under the device tool's 10-minute command limit): each
# step's limit is cut to what is left, and a step with under 20 s left is skipped. The machine needs torch (2.11 or
# newer) and timm >= 1.0.31, installed or on PYTHONPATH (which is kept); nothing is installed here.
# $OUT/summary.txt lists each step's exit status and seconds.
# DEVICE=cpu is a dry run on the CPU: env, grads and the sweep step's command, on small models.
set -u
OUT=${OUT:-device_check_out}
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
BUDGET=${BUDGET:-540}
STEPS=${STEPS:-env grads sweep compiled eager layout layout_modules distill train}
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" DEVICE
mkdir -p "$OUT"

step() {  # step NAME SECONDS CMD...: run CMD under a time limit, log to $OUT/NAME.log, record status and time
    local name=$1 limit=$2 start rc left=$((BUDGET - SECONDS))
    shift 2
    case " $STEPS " in *" $name "*) ;; *) return ;; esac
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

step grads 120 "$PY" - <<'PYTHON'
import contextlib
import os

import torch
import timm
import timm_posattn  # noqa: F401
from timm.utils import reparameterize_model
from timm_posattn.layers import PositionalAttention

device = os.environ['DEVICE']
torch.manual_seed(0)
arch, batch = ('vit_posattn_small_patch16_224', 16) if device == 'cuda' else ('vit_posattn_tiny_patch16_224', 2)
if device == 'cuda':
    model = timm.create_model(arch).to(device)
else:  # the dry run: the same checks on a small model
    model = timm.create_model(arch, depth=2)
x, y = torch.randn(batch, 3, 224, 224, device=device), torch.randint(0, 1000, (batch,), device=device)


def set_lean(on):
    """on: the model as shipped (the lean operators); off: plain autograd ops everywhere (the reference)."""
    for m in model.modules():
        if isinstance(m, PositionalAttention):
            m.lean = on


model.train()
for dtype in (None, torch.bfloat16):
    results = {}
    for lean in (False, True):
        set_lean(lean)
        model.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=dtype) if dtype else contextlib.nullcontext():
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        results[lean] = (loss.item(), [p.grad.float().clone() for p in model.parameters() if p.grad is not None])
    (loss0, grads0), (loss1, grads1) = results[False], results[True]
    rel = max(((a - b).norm() / a.norm().clamp_min(1e-12)).item() for a, b in zip(grads0, grads1))
    print(f'train {dtype or torch.float32}: loss {loss0:.6f} vs {loss1:.6f}, max relative grad difference {rel:.2e}')
    assert len(grads0) == len(grads1) and abs(loss0 - loss1) <= 1e-3 * abs(loss0), 'memory-saving path differs'
    assert rel < (1e-4 if dtype is None else 5e-2), 'memory-saving path gradients differ'

model.eval()
fused = reparameterize_model(model)
with torch.no_grad():
    for b in (1, batch):
        for dtype in (None, torch.bfloat16):
            with torch.autocast(device, dtype=dtype) if dtype else contextlib.nullcontext():
                set_lean(False)
                ref = model(x[:b]).float()
                set_lean(True)
                outs = {'lean': model(x[:b]).float(), 'reparameterized': fused(x[:b]).float()}
            for name, out in outs.items():
                err = ((out - ref).norm() / ref.norm()).item()
                print(f'infer batch {b} {dtype or torch.float32} {name}: relative difference {err:.2e}')
                assert err < (1e-4 if dtype is None else 5e-2), f'{name} inference differs'

# the operators inside one compiled graph: plain autograd's gradients (inductor on the GPU; the CPU dry run uses
# aot_eager, which traces the same graph without generating code)
torch.manual_seed(0)
small = timm.create_model(arch, depth=2, num_classes=10).to(device).train()
xs, ys = x[:batch], torch.randint(0, 10, (batch,), device=device)
backend = 'inductor' if device == 'cuda' else 'aot_eager'
grads = {}
for lean in (False, True):
    for m in small.modules():
        if isinstance(m, PositionalAttention):
            m.lean = lean
    torch._dynamo.reset()
    net = torch.compile(small, backend=backend, fullgraph=True) if lean else small
    small.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(net(xs), ys).backward()
    grads[lean] = [p.grad.float().clone() for p in small.parameters()]
rel = max(((a - b).norm() / a.norm().clamp_min(1e-12)).item() for a, b in zip(grads[False], grads[True]))
print(f'compiled train float32: max relative grad difference to eager plain autograd {rel:.2e}')
assert rel < 1e-3, 'compiled operators give other gradients'
print('grads OK')
PYTHON

if [ "$DEVICE" != cuda ]; then  # the sweep step's command, tiny, so a typo in it shows up before a GPU session
    step sweep 120 "$PY" benchmarks/throughput.py --device cpu --models vit_posattn_tiny_patch4_32 \
        --model-kwargs depth=1 --img-size 32 48 --batch-size 2 --train-batch-size 2 --repeats 1 \
        --json "$OUT/sweep.json" --plot "$OUT/sweep.png" --overwrite
    cat "$OUT/summary.txt"
    exit 0
fi

step sweep 240 "$PY" benchmarks/throughput.py --device cuda --dtype bfloat16 --img-size 224 384 512 \
    --batch-size 1 32 256 --train-batch-size 64 --repeats 5 --iters 10 --json "$OUT/sweep_bf16.json" \
    --plot "$OUT/sweep_bf16.png" --overwrite

step compiled 300 "$PY" benchmarks/throughput.py --device cuda --dtype bfloat16 --compile --img-size 224 384 \
    --batch-size 256 --train-batch-size 256 --reparam-batch-size --repeats 5 --iters 10 \
    --json "$OUT/sweep_compiled_bf16.json" --overwrite

step eager 120 "$PY" benchmarks/throughput.py --device cuda --dtype bfloat16 --batch-size 256 --modes train \
    --models vit_posattn_small_patch16_224 --json "$OUT/bf16_eager.json" --overwrite

step layout 60 "$PY" benchmarks/attention_layout.py --device cuda --dtype bfloat16 -b 256 --json "$OUT/layout.json"

step layout_modules 60 "$PY" benchmarks/attention_layout.py --device cuda --dtype bfloat16 -b 256 --projections \
    --json "$OUT/layout_modules.json"

step distill 60 "$PY" benchmarks/distill_step.py --device cuda --dtype bfloat16 -b 128 --repeats 5 --iters 5 \
    --json "$OUT/distill_step.json" --overwrite

step train 150 "$PY" train.py --device cuda --amp --amp-dtype bfloat16 --epochs 1 --output "$OUT" \
    --experiment cuda_bf16 --no-attention-plot

step fmnist 520 env DEVICE=cuda OUT="$OUT/fashion_mnist" FMNIST="${FMNIST:-.device_data/fashion-mnist}" \
    PYTHON="$PY" bash benchmarks/fashion_mnist.sh

cat "$OUT/summary.txt"
