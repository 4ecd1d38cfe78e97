#!/bin/bash
# One autoresearch lab on the nodes of one Slurm job, through Ray (README: "One lab, many machines").
# From the repository root, on a login node where `uv sync --group ray` has been run once:
#   sbatch --nodes=2 --export=ALL,TAG=nov26,AGENT=mutate,HOURS=8 autoresearch/launch/slurm.sh
#   tail -f autoresearch-JOBID.out; then `uv run agent_loop.py report` in the repository
# Every node prepares the data (with a shared home: once, the others find it ready), the first node starts
# the Ray head and runs the coordinator, the others join; each experiment's runs are Ray tasks of one GPU.
#SBATCH --job-name=autoresearch
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=09:00:00
#SBATCH --output=autoresearch-%j.out
set -euo pipefail
TAG=${TAG:-lab}
AGENT=${AGENT:-mutate}
HOURS=${HOURS:-8}
RAY_PORT=${RAY_PORT:-6390}
cd "${SLURM_SUBMIT_DIR:-.}"

mapfile -t nodes < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
head_node=${nodes[0]}
head_ip=$(srun --overlap --nodes=1 --ntasks=1 -w "$head_node" hostname --ip-address | awk '{print $1}')

srun --overlap --ntasks-per-node=1 uv run prepare.py
srun --overlap --nodes=1 --ntasks=1 -w "$head_node" \
  uv run ray start --head --node-ip-address="$head_ip" --port="$RAY_PORT" --include-dashboard=false \
  --disable-usage-stats --block &
sleep 20
if [ "${#nodes[@]}" -gt 1 ]; then
  srun --overlap --nodes=$((${#nodes[@]} - 1)) --ntasks-per-node=1 --exclude="$head_node" \
    uv run ray start --address="$head_ip:$RAY_PORT" --disable-usage-stats --block &
  sleep 20
fi

if git rev-parse -q --verify "refs/heads/autoresearch/$TAG" >/dev/null; then
  git checkout -q "autoresearch/$TAG"
else
  uv run agent_loop.py init --tag "$TAG"
fi
uv run agent_loop.py run --agent "$AGENT" --workers auto --executor ray --address "$head_ip:$RAY_PORT" --hours "$HOURS"
uv run agent_loop.py report
