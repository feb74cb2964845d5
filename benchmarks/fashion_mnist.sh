#!/usr/bin/env bash
# The Fashion-MNIST comparison of docs/real_images.md: the positional model (qk), the tied form, its standard twin
# and timm's own ViT of the same shape, one seed, the same recipe (configs/fashion_mnist_*.yaml) and budget, then the
# table (benchmarks/fashion_mnist_table.py). From the repository root:
#
#     FMNIST=/usr/share/datasets/fashion-mnist OUT=runs/fm bash benchmarks/fashion_mnist.sh     # CPU: hours
#     DEVICE=cuda EPOCHS=10 OUT=runs/fm bash benchmarks/fashion_mnist.sh                         # a GPU: minutes
#
# FMNIST: the folder of the four idx .gz files (`apt-get install dataset-fashion-mnist`, or a copy of them: for a
# lent GPU, copy them into a git-ignored folder of the checkout, e.g. .device_data/fashion-mnist, and carry it).
# DEVICE, EPOCHS (default: the recipe's 10), SEED (42), WORKERS (data loading processes; default 0 on the CPU, 8 on a
# GPU), MODELS (default: "qk tied standard timm"), RECIPE: "comparison" (default: the recipe the table of
# docs/real_images.md was measured with, the configs plus COMPARISON_ARGS below) or "configs" (the configs as they
# are, tuned since for the one-epoch check). A run whose folder already holds a finished run is kept (resume by
# running again); each run's log is OUT/NAME.log.
set -u
COMPARISON_ARGS=(--warmup-epochs 1 --smoothing 0.1 --scale 0.8 1.0 --ratio 0.9 1.1111111 --hflip 0.5)
FMNIST=${FMNIST:-.device_data/fashion-mnist}
OUT=${OUT:-runs/fashion_mnist}
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cpu}
SEED=${SEED:-42}
MODELS=${MODELS:-qk tied standard timm}
if [ "$DEVICE" = cpu ]; then WORKERS=${WORKERS:-0}; else WORKERS=${WORKERS:-8}; fi
EPOCHS_ARG=()
[ -n "${EPOCHS:-}" ] && EPOCHS_ARG=(--epochs "$EPOCHS")
case ${RECIPE:-comparison} in
    comparison) RECIPE_ARGS=("${COMPARISON_ARGS[@]}") ;;
    configs) RECIPE_ARGS=() ;;
    *) echo "error: unknown RECIPE '$RECIPE': expected comparison or configs" >&2; exit 2 ;;
esac
mkdir -p "$OUT"
for name in $MODELS; do
    case $name in
        qk) args=(-c configs/fashion_mnist_posattn.yaml) ;;
        tied) args=(-c configs/fashion_mnist_posattn.yaml --model-kwargs pos_attn_blocks=all pos_attn_layer=tied) ;;
        standard) args=(-c configs/fashion_mnist_standard.yaml) ;;
        timm) args=(-c configs/fashion_mnist_standard.yaml --model vit_tiny_patch16_224 --model-kwargs patch_size=4
                    embed_dim=192 depth=7 num_heads=12 mlp_ratio=1) ;;
        *) echo "error: unknown model '$name' in MODELS: expected qk, tied, standard or timm" >&2; exit 2 ;;
    esac
    if [ -f "$OUT/$name/last.pth.tar" ] && grep -q "^Final top-1" "$OUT/$name.log" 2>/dev/null; then
        echo "$name: finished earlier ($OUT/$name), kept"
        continue
    fi
    echo "== $name"
    start=$(date +%s)
    "$PY" train.py "${args[@]}" "${RECIPE_ARGS[@]}" "${EPOCHS_ARG[@]}" --data-dir "$FMNIST" --device "$DEVICE" \
        --seed "$SEED" \
        -j "$WORKERS" --output "$OUT" --experiment "$name" --log-interval 100 >"$OUT/$name.log" 2>&1
    rc=$?
    echo "$name rc=$rc $(($(date +%s) - start))s" | tee -a "$OUT/times.txt"
    grep -h "^Final top-1\|^error" "$OUT/$name.log"
done
"$PY" benchmarks/fashion_mnist_table.py "$OUT"/*/
