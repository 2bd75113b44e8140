#!/usr/bin/env bash
# The GPU check, ready to run on a machine with CUDA (under 8 minutes on one H200):
#   bash bench/gpu_check.sh            # from the repository root
# 1. what this torch has and lacks; 2. the measured CUDA profile next to the published one;
# 3. bench/cost_model.py on CUDA at batch 1 and 128, fp32 and fp16 (eager);
# 4. RepVGG-A0/B0 and MobileOne-S0 at batch 128, training form vs plain, eager and inductor.
# It installs nothing: repfx runs from this working tree on the machine's own torch. repfx.passes lives
# in passes/ (the installed package maps it), so a shim directory links repfx/ and passes/ together.
# Without CUDA it says so and runs steps 1-3 on the CPU at small sizes (a smoke test of the script).
set -u
cd "$(dirname "$0")/.."
SHIM="$(mktemp -d)"
trap 'rm -rf "$SHIM"' EXIT
mkdir "$SHIM/repfx"
for entry in repfx/*; do ln -s "$PWD/$entry" "$SHIM/repfx/"; done
ln -s "$PWD/passes" "$SHIM/repfx/passes"
export PYTHONPATH="$SHIM:$PWD/bench"
export REPFX_CACHE_DIR="${REPFX_CACHE_DIR:-$SHIM/cache}"
PY="${PYTHON:-python3}"

echo "== 1. environment"
"$PY" - <<'PYEOF'
import importlib.util, sys, torch
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}"
      + (f" ({torch.cuda.get_device_name()}, CUDA {torch.version.cuda})" if torch.cuda.is_available() else ""))
if not torch.__version__.startswith("2.14"):
    print(f"note: repfx pins torch 2.14.1; this is {torch.__version__} (torch.export and aten op sets may differ)")
for module, what in (("onnxruntime", "ONNX Runtime rows"), ("onnx", "ONNX export"), ("timm", "timm comparisons"),
                     ("torch_tensorrt", "TensorRT rows"), ("platformdirs", "the profile cache location"),
                     ("triton", "torch.compile (inductor) on CUDA")):
    if importlib.util.find_spec(module) is None:
        print(f"lacks {module}: no {what}")
PYEOF

if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    DEVICE=cuda; BATCHES="1 128"; PRECISIONS="fp32 fp16"; ROUNDS=3
else
    echo "no CUDA device: steps 2-3 run on the CPU at small sizes; step 4 is skipped"
    DEVICE=cpu; BATCHES="1"; PRECISIONS="fp32"; ROUNDS=1
fi

echo; echo "== 2. device profile"
timeout 120 "$PY" - "$DEVICE" <<'PYEOF'
import sys
from repfx.targets import device_profile, published_profile
measured = device_profile(sys.argv[1])
print(f"measured:  {measured}")
if sys.argv[1] == "cuda":
    for name in ("h200", "h100"):
        print(f"published: {published_profile(name)}")
PYEOF

echo; echo "== 3. cost model on $DEVICE"
timeout 300 "$PY" bench/cost_model.py --device "$DEVICE" --batches $BATCHES --precisions $PRECISIONS \
    --runtimes eager --rounds "$ROUNDS" --repeats 3 || echo "cost_model.py exited with $?"

if [ "$DEVICE" = cuda ]; then
    echo; echo "== 4. deploy speed at batch 128"
    timeout 240 "$PY" bench/gpu_speed.py --device cuda --batch 128 --rounds 3 || echo "gpu_speed.py exited with $?"
fi
