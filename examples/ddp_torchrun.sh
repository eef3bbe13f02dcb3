#!/usr/bin/env bash
# Two CPU processes (gloo) training with SMDACallback (PYTHON=path/to/venv/python to pick the interpreter): probes are sharded across ranks and gathered,
# every rank reaches the same policy and alert decision, rank 0 writes the ledger.
#   bash examples/ddp_torchrun.sh            # tiny model (seconds)
#   bash examples/ddp_torchrun.sh --limit 20 # the embedded model, without --smoke
set -euo pipefail
cd "$(dirname "$0")/.."
args=("$@")
[ ${#args[@]} -eq 0 ] && args=(--smoke)
exec "${PYTHON:-python}" -m torch.distributed.run --nproc_per_node 2 --master_port "${MASTER_PORT:-29541}" \
  examples/sft_with_smda.py --out runs/example-ddp "${args[@]}"
