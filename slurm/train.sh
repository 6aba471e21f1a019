#!/usr/bin/env bash
#SBATCH --job-name=megagym-train
#SBATCH --output=slurm-%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@180
# megagym GRPO training on Slurm, any config: `sbatch -N NODES [--gpus-per-node=G] slurm/train.sh [key=value ...]`
# (slurm/train_dapo.sh and slurm/train_workplace.sh set MEGAGYM_CONFIG and a job name, then run this).
# GPU requests are never #SBATCH lines here (a GPU-less node refuses them): pass them to sbatch.
#
# Layout: the job's nodes are split into trainer nodes (first) and policy-server nodes (the rest).
# Trainer ranks: one srun step, one task per rank, torch.distributed rendezvous at the first node
# (MASTER_ADDR/MASTER_PORT exported here; ranks from SLURM_PROCID/SLURM_NTASKS). Rank 0 starts Gym
# on the first node. Policy servers: one srun step, `MEGAGYM_SERVERS_PER_NODE` tasks per server node,
# each publishing its URL in the log folder; the trainer gets them as servers.urls. On one node the
# GPUs are shared: trainer ranks take the first ones, servers the rest.
#
# Preemption / time limit: `--signal=B:USR1@180` warns this script 180 s ahead; it stops the trainer
# (ranks stop Gym), the servers, then `scontrol requeue`s the job. Every start passes --resume, so
# a requeued (or preempted and requeued) job continues from the last complete checkpoint. Chain jobs
# with `sbatch --dependency=singleton` (same job name): each waits for the previous one; a job that
# finds the run finished exits at once.
#
# Variables (defaults in brackets); see slurm/common.sh for MEGAGYM_REPO, MEGAGYM_VENV,
# MEGAGYM_CONTAINER_IMAGE, MEGAGYM_CONTAINER_MOUNTS, MEGAGYM_SRUN_ARGS:
#   MEGAGYM_CONFIG            run YAML [required here; set by train_dapo.sh / train_workplace.sh]
#   MEGAGYM_OVERRIDES         key=value overrides, whitespace-separated; script arguments are appended
#   MEGAGYM_MODEL             HF folder of the initial policy -> model.hf_path [the config's]
#   MEGAGYM_OUTPUT_DIR        run folder (checkpoints, metrics, logs) -> run.output_dir [the config's]
#   MEGAGYM_GYM_VENV          Gym's venv -> env.venv [the config's, .venv-gym]
#   MEGAGYM_GPUS_PER_NODE     GPUs per node [$SLURM_GPUS_ON_NODE, else 0 = CPU]
#   MEGAGYM_SERVER_NODES      nodes for policy servers [half the nodes (rounded down); 0 on one node]
#   MEGAGYM_GPUS_PER_SERVER   GPUs per policy server (vLLM tensor parallel) [1; 0 on CPU]
#   MEGAGYM_SERVERS_PER_NODE  servers per server node [GPUs / GPUs per server; on a shared node half
#                             the GPUs' worth; 1 on CPU]
#   MEGAGYM_TRAIN_PROCS_PER_NODE  trainer ranks per trainer node [its GPUs not used by servers; 1 on CPU]
#   MEGAGYM_MASTER_PORT       torch.distributed port [20001 + job id % 10000]
#   MEGAGYM_SERVER_PORT       port of the first server on a node [0 = a free port]
#   MEGAGYM_SERVER_BIND       servers' listening address [127.0.0.1 on one node, else 0.0.0.0: the
#                             trainer and Gym call them from other nodes]
#   MEGAGYM_SERVER_TIMEOUT    seconds for all servers to become healthy [1200]
#   MEGAGYM_LOG_DIR           component logs [<output_dir>/logs/slurm-<job id>-r<restart count>]
# Logs: trainer_<rank>.log, server_<i>.log, gym/gym.log (Gym), and this script's own output file.
set -euo pipefail
MG_SCRIPT=train
# shellcheck source=slurm/common.sh
source "${MEGAGYM_REPO:-${SLURM_SUBMIT_DIR:-$(pwd)}}/slurm/common.sh"
mg_init

CONFIG=${MEGAGYM_CONFIG:?set MEGAGYM_CONFIG (or use slurm/train_dapo.sh / slurm/train_workplace.sh)}
read -r -a OVERRIDES <<< "${MEGAGYM_OVERRIDES:-}"
OVERRIDES+=("$@")
[ -n "${MEGAGYM_MODEL:-}" ] && OVERRIDES+=("model.hf_path=$MEGAGYM_MODEL")
[ -n "${MEGAGYM_OUTPUT_DIR:-}" ] && OVERRIDES+=("run.output_dir=$MEGAGYM_OUTPUT_DIR")
[ -n "${MEGAGYM_GYM_VENV:-}" ] && OVERRIDES+=("env.venv=$MEGAGYM_GYM_VENV")

# ---------------------------------------------------------------- layout
N=${#MG_NODES[@]}
GPUS=${MEGAGYM_GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-0}}
SERVER_NODES=${MEGAGYM_SERVER_NODES:-$(( N > 1 ? N / 2 : 0 ))}
TRAIN_NODES=$(( N - SERVER_NODES ))
[ "$TRAIN_NODES" -ge 1 ] || mg_die "MEGAGYM_SERVER_NODES=$SERVER_NODES leaves no trainer node of $N"
if [ "$GPUS" -gt 0 ]; then
  GPUS_PER_SERVER=${MEGAGYM_GPUS_PER_SERVER:-1}
  if [ "$SERVER_NODES" -eq 0 ]; then
    SERVERS_PER_NODE=${MEGAGYM_SERVERS_PER_NODE:-$(( GPUS / 2 / GPUS_PER_SERVER ))}
    TRAIN_PROCS=${MEGAGYM_TRAIN_PROCS_PER_NODE:-$(( GPUS - SERVERS_PER_NODE * GPUS_PER_SERVER ))}
    GPU_OFFSET=$TRAIN_PROCS
  else
    SERVERS_PER_NODE=${MEGAGYM_SERVERS_PER_NODE:-$(( GPUS / GPUS_PER_SERVER ))}
    TRAIN_PROCS=${MEGAGYM_TRAIN_PROCS_PER_NODE:-$GPUS}
    GPU_OFFSET=0
  fi
  OVERRIDES+=("servers.settings.tensor_parallel_size=$GPUS_PER_SERVER")
else
  GPUS_PER_SERVER=0 GPU_OFFSET=0
  SERVERS_PER_NODE=${MEGAGYM_SERVERS_PER_NODE:-1}
  TRAIN_PROCS=${MEGAGYM_TRAIN_PROCS_PER_NODE:-1}
fi
[ "$SERVERS_PER_NODE" -ge 1 ] && [ "$TRAIN_PROCS" -ge 1 ] || mg_die "no GPUs left for servers or ranks (GPUS=$GPUS)"
TRAIN_LIST=$(IFS=,; echo "${MG_NODES[*]:0:TRAIN_NODES}")
if [ "$SERVER_NODES" -eq 0 ]; then SERVER_HOSTS=1 SERVER_LIST=${MG_NODES[0]}
else SERVER_HOSTS=$SERVER_NODES SERVER_LIST=$(IFS=,; echo "${MG_NODES[*]:TRAIN_NODES:SERVER_NODES}"); fi
SERVER_COUNT=$(( SERVER_HOSTS * SERVERS_PER_NODE ))
RANKS=$(( TRAIN_NODES * TRAIN_PROCS ))
OVERRIDES+=("servers.count=$SERVER_COUNT")

# ---------------------------------------------------------------- the run so far
RUN_INFO=$(mg_py -m megagym.cluster query "$CONFIG" "${OVERRIDES[@]}" --get output_dir --get done --get latest)
mapfile -t INFO <<< "$RUN_INFO"
OUTPUT_DIR=${INFO[0]} LATEST=${INFO[2]:-}
if [ "${INFO[1]}" = 1 ]; then
  mg_log "run $OUTPUT_DIR is already finished ($LATEST is at the last step); nothing to do"
  exit 0
fi
MODEL_OVERRIDE=$(mg_py -m megagym.cluster query "$CONFIG" "${OVERRIDES[@]}" --get model_override)
[ -n "$MODEL_OVERRIDE" ] && OVERRIDES+=("$MODEL_OVERRIDE")
LOG_DIR=${MEGAGYM_LOG_DIR:-$OUTPUT_DIR/logs/slurm-${SLURM_JOB_ID:-local}-r${SLURM_RESTART_COUNT:-0}}
mkdir -p "$LOG_DIR"
export MASTER_ADDR=${MG_NODES[0]}
export MASTER_PORT=${MEGAGYM_MASTER_PORT:-$(( 20001 + ${SLURM_JOB_ID:-0} % 10000 ))}
export MEGAGYM_GPUS_PER_SERVER=$GPUS_PER_SERVER MEGAGYM_GPU_OFFSET=$GPU_OFFSET
START="fresh start"
[ -n "$LATEST" ] && START="resuming from $LATEST"
mg_log "job ${SLURM_JOB_ID:-?} restart ${SLURM_RESTART_COUNT:-0}: $CONFIG -> $OUTPUT_DIR ($START)"
mg_log "nodes: trainer $TRAIN_LIST ($RANKS ranks, rendezvous $MASTER_ADDR:$MASTER_PORT); servers $SERVER_LIST ($SERVER_COUNT x $GPUS_PER_SERVER GPU); logs $LOG_DIR"

# ---------------------------------------------------------------- teardown, preemption
SERVER_PID="" TRAINER_PID="" PREEMPTED=0
stop_step() {  # $1 = pid of an srun; SIGTERM (srun forwards it to the tasks), bounded wait, then SIGKILL
  local pid=$1 i
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for i in $(seq 1 "${2:-60}"); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}
cleanup() {
  trap - EXIT TERM INT
  stop_step "$TRAINER_PID" 90
  stop_step "$SERVER_PID" 60
  if [ -f "$LOG_DIR/gym/gym_stack.json" ]; then  # rank 0 died before it could stop Gym
    mg_py -c 'import sys
from megagym.gym.process import stop_from_state
try:
    stop_from_state(sys.argv[1])
except FileNotFoundError:  # rank 0 finished stopping it meanwhile
    pass' "$LOG_DIR/gym" || true
  fi
}
on_usr1() {
  mg_log "USR1: preemption or time limit ahead; stopping and requeueing (resume from the last checkpoint)"
  PREEMPTED=1
  cleanup
  scontrol requeue "$SLURM_JOB_ID" || mg_log "scontrol requeue failed; resubmit with --dependency=singleton"
  exit 0
}
trap cleanup EXIT
trap 'mg_log "terminated"; exit 143' TERM INT
trap on_usr1 USR1

# ---------------------------------------------------------------- policy servers
URL_DIR=$LOG_DIR/urls
rm -rf "$URL_DIR"
mg_srun --nodes="$SERVER_HOSTS" --ntasks="$SERVER_COUNT" --ntasks-per-node="$SERVERS_PER_NODE" \
  --nodelist="$SERVER_LIST" --output="$LOG_DIR/server_%t.log" --kill-on-bad-exit=0 -- \
  python -m megagym.cluster serve "$CONFIG" "${OVERRIDES[@]}" --url-dir "$URL_DIR" \
  --port-base "${MEGAGYM_SERVER_PORT:-0}" --bind "${MEGAGYM_SERVER_BIND:-$([ "$N" -gt 1 ] && echo 0.0.0.0 || echo 127.0.0.1)}" &
SERVER_PID=$!
# in the background so that a USR1/TERM arriving meanwhile is handled at once
mg_py -m megagym.cluster wait "$URL_DIR" --count "$SERVER_COUNT" --timeout "${MEGAGYM_SERVER_TIMEOUT:-1200}" \
  --watch-pid "$SERVER_PID" > "$LOG_DIR/server_urls.json" &
wait $! || mg_die "policy servers did not come up (see $LOG_DIR/server_*.log)"
URLS=$(cat "$LOG_DIR/server_urls.json")
mg_log "policy servers ready: $URLS"

# ---------------------------------------------------------------- trainer ranks (+ Gym on rank 0)
mg_srun --nodes="$TRAIN_NODES" --ntasks="$RANKS" --ntasks-per-node="$TRAIN_PROCS" \
  --nodelist="$TRAIN_LIST" --output="$LOG_DIR/trainer_%t.log" --kill-on-bad-exit=1 -- \
  python -m megagym.train --worker "$CONFIG" "${OVERRIDES[@]}" "servers.urls=$URLS" \
  "env.run_dir=$LOG_DIR/gym" "rollout.progress=false" --resume &
TRAINER_PID=$!
set +e
wait "$TRAINER_PID"; rc=$?
while [ "$rc" -gt 128 ] && kill -0 "$TRAINER_PID" 2>/dev/null; do  # a trapped signal interrupted wait
  wait "$TRAINER_PID"; rc=$?
done
set -e
TRAINER_PID=""
mg_log "trainer exited with $rc (see $LOG_DIR/trainer_0.log)"
cleanup
[ "$rc" -eq 0 ] && mg_log "finished; checkpoints in $OUTPUT_DIR"
exit "$rc"
