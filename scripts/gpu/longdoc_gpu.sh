#!/usr/bin/env bash
# Long-document classification on one GPU (scripts/gpu/longdoc_gpu.py), from the repository root:
#   bash scripts/gpu/longdoc_gpu.sh RUN_DIR            # RUN_DIR: a train.py run to start from (or none)
#   bash scripts/gpu/longdoc_gpu.sh none --smoke       # toy sizes
# Results go to $OUT (default ./longdoc_out). On an image without hydra/omegaconf the wheels in .whl/
# (or $WHL_DIR) are installed into /tmp/site first.
set -euo pipefail
cd "$(dirname "$0")/../.."
if ! python3 -c "import hydra, omegaconf" 2>/dev/null; then
  whl="${WHL_DIR:-.whl}"
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site "$whl"/*.whl
  export PYTHONPATH="$PWD:/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}"
exec python3 scripts/gpu/longdoc_gpu.py "$@" --out "${OUT:-longdoc_out}"
