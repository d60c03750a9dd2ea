#!/usr/bin/env bash
# The GPU checks of one device session, as one prepared command (see docs/benchmarks.md):
# the CUDA-only tests, then the targets and the fast-path ablation with `sdbridge bench`.
# Here first:   ../shared/tools/device-wheels.sh accelerate peft psutil   (diffusers etc. as wheels in .whl/;
#               peft, for the LoRA tests, needs accelerate and psutil; the device image has none of them)
# Then, with the device tool:  run(command="bash benchmarks/gpu_session.sh", carry=[".whl"], timeout_s=580)
# Results land in $OUT (the device tool brings them back) or ./gpu-results when OUT is unset.
set -uo pipefail
out=${OUT:-gpu-results}
mkdir -p "$out"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1
fi
export PYTHONUNBUFFERED=1
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; python3 -c "import torch; print('torch', torch.__version__, torch.version.cuda)"; } | tee "$out/machine.txt"
timeout 120 python3 -m pytest -q -x tests/test_fast_path.py 2>&1 | tee "$out/tests.txt" | tail -3
timeout 400 python3 benchmarks/fast_path.py --targets --ablation --seconds 6 --timeout 150 \
  --json-out "$out/bench.json" 2>"$out/bench-progress.txt" | tee "$out/bench.md"
# What a full-size SD 1.5 ControlNet costs per frame (random:sd15 + random ControlNet, 512x512)
timeout 150 python3 benchmarks/controlnet_cost.py --seconds 4 --json-out "$out/controlnet.json" \
  2>"$out/controlnet-progress.txt" | tee "$out/controlnet.md"
