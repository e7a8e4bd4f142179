#!/usr/bin/env bash
# Multi-node training on SLURM: one torchrun per node, torchrun starts one process per GPU and the
# nodes meet through the c10d rendezvous on the first node of the allocation.
#
#   sbatch --nodes=2 scripts/slurm_train.sh model=gpt2_xl seq_len=8192 parallel.activation_checkpointing=full
#   sbatch --nodes=4 --gpus-per-node=8 scripts/slurm_train.sh model=gpt2_large seq_len=4096
#
# Everything after the script name is passed to train.py as Hydra overrides. The run directory is
# fixed per job name (RUN_DIR to change it) and resume=auto is set, so a requeued or resubmitted
# job continues from the newest complete checkpoint, on any number of nodes (DCP reshards).
#
#SBATCH --job-name=longctx-gpt
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1          # one torchrun per node; it forks the per-GPU processes
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail

GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
RDZV_PORT=${RDZV_PORT:-29500}
RUN_DIR=${RUN_DIR:-outputs/${SLURM_JOB_NAME}}
PYTHON=${PYTHON:-python}

# Never NVLink multicast (NVLS); trainer/distributed.py sets the same default. A timed-out
# collective aborts the job (with the rank in the message) instead of hanging until the wall time.
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
# export NCCL_SOCKET_IFNAME=ib0   # pick the interface if the nodes have several
# export NCCL_DEBUG=WARN          # INFO to see rings/channels when debugging the network

echo "nodes=$SLURM_JOB_NUM_NODES gpus/node=$GPUS_PER_NODE head=$HEAD_NODE:$RDZV_PORT run_dir=$RUN_DIR"

srun --kill-on-bad-exit=1 "$PYTHON" -m torch.distributed.run \
    --nnodes="$SLURM_JOB_NUM_NODES" \
    --nproc_per_node="$GPUS_PER_NODE" \
    --rdzv_id="$SLURM_JOB_ID" \
    --rdzv_backend=c10d \
    --rdzv_endpoint="$HEAD_NODE:$RDZV_PORT" \
    train.py parallel=fsdp run_dir="$RUN_DIR" resume=auto "$@"
