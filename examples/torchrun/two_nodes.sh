#!/bin/bash
# memwatch on two GPU machines without a scheduler: torchrun (Lightning's TorchElasticEnvironment).
# Run the same command on both machines, from a checkout on a filesystem both see at the same path
# (see examples/slurm/memwatch_ldm.sbatch for what must be shared), NODE_RANK=0 on the first:
#
#   host0$ NODE_RANK=0 MASTER_ADDR=host0 bash examples/torchrun/two_nodes.sh [more cli.py arguments]
#   host1$ NODE_RANK=1 MASTER_ADDR=host0 bash examples/torchrun/two_nodes.sh [more cli.py arguments]
#
# torchrun starts GPUS_PER_NODE processes per machine and sets RANK, LOCAL_RANK, WORLD_SIZE,
# GROUP_RANK (the node), MASTER_ADDR and MASTER_PORT for each; Lightning reads them and refuses to
# start unless --trainer.devices × --trainer.num_nodes equals WORLD_SIZE. Each process drives the
# GPU of its LOCAL_RANK, so --trainer.devices must be the number of processes per machine.
# MASTER_PORT must be free on host0 and reachable from host1.
set -euo pipefail
: "${NODE_RANK:?set NODE_RANK: 0 on the machine at MASTER_ADDR, 1 on the other}"
: "${MASTER_ADDR:?set MASTER_ADDR: the host name or address of the machine with NODE_RANK=0}"
MASTER_PORT=${MASTER_PORT:-29500}
NNODES=${NNODES:-2}
GPUS_PER_NODE=${GPUS_PER_NODE:-4}   # EDIT: GPUs per machine
PYTHON=${PYTHON:-.venv/bin/python}  # EDIT if the environment lives elsewhere
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}  # INFO to see the interface and transport NCCL picked
# export NCCL_SOCKET_IFNAME=eth0       # EDIT if NCCL picks an interface the other machine cannot reach

cd "$(dirname "$0")/../.."
exec "$PYTHON" -m torch.distributed.run \
    --nnodes "$NNODES" --nproc_per_node "$GPUS_PER_NODE" --node_rank "$NODE_RANK" \
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
    cli.py fit --config configs/mrnet_ldm.yaml \
    --trainer.num_nodes "$NNODES" \
    --trainer.devices "$GPUS_PER_NODE" \
    --trainer.strategy ddp \
    --trainer.accelerator gpu \
    "$@"
