#!/usr/bin/env bash
# Render an sbatch script that runs one stablerep-jax job over several GPU nodes, and submit it.
#
# Layout: one process per node (srun --ntasks-per-node=1), each driving all of its node's GPUs.
# That is JAX's usual multi-host layout: one tf.data pipeline and one file slice per host, and
# NCCL within a node. Process 0 runs on the first node of the allocation and is the coordinator.
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
Usage: $SCRIPT_NAME --job JOB [--config FILE[:PRESET]] [--workdir DIR] [options] [-- JOB_FLAGS...]

Run on a SLURM login node, from a checkout on a file system the compute nodes share. Installs
'.[cuda12]' into .venv (there, once), writes LOG_DIR/JOB_NAME-TIMESTAMP.sbatch and submits it.
The script starts one process per node; for train each gets
  --coordinator_address=<first host of \$SLURM_JOB_NODELIST>:PORT
  --num_processes=\$SLURM_NTASKS --process_id=\$SLURM_PROCID
(other jobs find the cluster through JAX's SLURM detection). Per-node output goes to
LOG_DIR/JOB-<jobid>-<node>.log. Resubmitting a train command resumes from --workdir.

Job:
  --job JOB              one of: ${JOBS[*]}
  --config SPEC          config file[:preset] (required except for demo)
  --workdir DIR          required for: ${WORKDIR_JOBS[*]}; on the shared file system
  -- JOB_FLAGS...        everything after '--' goes to the job, e.g. --config.batch_size=512

Allocation:
  --nodes N              nodes (default 1)
  --gpus-per-node G      GPUs per node (default 8)
  --time T               wall-clock limit, SLURM format (default 24:00:00)
  --partition P          partition (default: the cluster's)
  --account A            account to charge (default: yours)
  --cpus-per-task N      CPU cores per process (feeds tf.data; default: the cluster's)
  --job-name NAME        default stablerep-JOB
  --sbatch-arg ARG       one more '#SBATCH ARG' line, e.g. --sbatch-arg=--exclusive (repeatable)
  --port PORT            coordinator port on the first node (default 12345)

Environment and files:
  --mem-fraction F       XLA_PYTHON_CLIENT_MEM_FRACTION (default: the environment's, else .90)
  --venv DIR             virtualenv on the shared file system (default .venv)
  --log-dir DIR          sbatch script and logs (default logs)
  --no-install           skip the install (venv + pip) on this node
  --dry-run              print every command and the sbatch script (prefixed '+ '), run nothing
  -h, --help             this help

Example:
  $SCRIPT_NAME --nodes 4 --gpus-per-node 8 --partition gpu --account my-lab --time 48:00:00 \\
      --job train --config configs/stablerep.py:vit_b16_cc12m_1x --workdir /shared/runs/b16_1x \\
      -- --config.data.train_files='/shared/cc12m_syn/*.tfrecord'
EOF
}

NODES=1
GPUS_PER_NODE=8
TIME_LIMIT=24:00:00
PARTITION=""
ACCOUNT=""
CPUS_PER_TASK=""
JOB_NAME=""
SBATCH_ARGS=()
PORT=12345
MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-.90}
LOG_DIR=logs
RESUME_NOTICE=300   # seconds of warning before the time limit (train: save, exit, requeue)
# --venv and --no-install set VENV and INSTALL, defined in common.sh.

# parse_options handler: this script's own options.
slurm_option() {
  case $1 in
    --nodes) require_value "$1" "${2-}"; require_uint "$1" "$2"; NODES=$2; OPTION_WORDS=2 ;;
    --gpus-per-node) require_value "$1" "${2-}"; require_uint "$1" "$2"; GPUS_PER_NODE=$2; OPTION_WORDS=2 ;;
    --time) require_value "$1" "${2-}"; TIME_LIMIT=$2; OPTION_WORDS=2 ;;
    --partition) require_value "$1" "${2-}"; PARTITION=$2; OPTION_WORDS=2 ;;
    --account) require_value "$1" "${2-}"; ACCOUNT=$2; OPTION_WORDS=2 ;;
    --cpus-per-task) require_value "$1" "${2-}"; require_uint "$1" "$2"; CPUS_PER_TASK=$2; OPTION_WORDS=2 ;;
    --job-name) require_value "$1" "${2-}"; JOB_NAME=$2; OPTION_WORDS=2 ;;
    --sbatch-arg)
      [[ -n ${2-} ]] || die "option $1 needs a value"
      SBATCH_ARGS+=("$2"); OPTION_WORDS=2 ;;
    --port) require_value "$1" "${2-}"; require_uint "$1" "$2"; PORT=$2; OPTION_WORDS=2 ;;
    --mem-fraction) require_value "$1" "${2-}"; require_fraction "$1" "$2"; MEM_FRACTION=$2; OPTION_WORDS=2 ;;
    --venv) require_value "$1" "${2-}"; VENV=$2; OPTION_WORDS=2 ;;
    --log-dir) require_value "$1" "${2-}"; LOG_DIR=$2; OPTION_WORDS=2 ;;
    --no-install) INSTALL=0; OPTION_WORDS=1 ;;
  esac
}

parse_args() {
  parse_options slurm_option "$@"
  check_job_options
  check_config_file
  ((NODES >= 1)) || die "--nodes must be at least 1"
  ((GPUS_PER_NODE >= 1)) || die "--gpus-per-node must be at least 1"
  ((PORT >= 1024 && PORT <= 65535)) || die "--port must be in 1024-65535, got $PORT"
  [[ $TIME_LIMIT =~ ^[0-9:-]+$ ]] || die "--time '$TIME_LIMIT' is not a SLURM time (e.g. 24:00:00 or 2-00:00:00)"
  [[ -n $JOB_NAME ]] || JOB_NAME=stablerep-$JOB
  [[ $JOB_NAME =~ ^[A-Za-z0-9._-]+$ ]] || die "--job-name '$JOB_NAME' may only hold letters, digits and . _ -"
  local arg
  for arg in "${SBATCH_ARGS[@]}"; do
    [[ $arg == -* && $arg != *$'\n'* ]] || die "--sbatch-arg '$arg' must be one sbatch option such as --exclusive"
  done
  # Values that land on '#SBATCH' lines: a newline would start a new line (or command), a
  # space would end the option early.
  sbatch_word --partition "$PARTITION"
  sbatch_word --account "$ACCOUNT"
  [[ $(absolute "$LOG_DIR") != *[[:space:]]* ]] \
    || die "--log-dir $(quote_one "$(absolute "$LOG_DIR")") holds whitespace, which the '#SBATCH --output' line cannot carry; choose a path without spaces"
}

# sbatch_word OPTION VALUE: VALUE may go on an #SBATCH line (empty: option not given).
sbatch_word() {
  [[ -z $2 || $2 =~ ^[A-Za-z0-9._,:+=@-]+$ ]] \
    || die "$1 $(quote_one "$2") may only hold letters, digits and . _ , : + = @ - (it goes on an #SBATCH line)"
}

# absolute PATH: PATH made absolute against the checkout (compute nodes start elsewhere).
absolute() {
  if [[ $1 == /* ]]; then printf '%s' "$1"; else printf '%s' "$REPO_ROOT/$1"; fi
}

# The sbatch script, on stdout. Values are quoted for bash; $SLURM_* expand on the nodes.
render_sbatch() {
  local log_dir python
  log_dir=$(absolute "$LOG_DIR")
  python=$(absolute "$VENV")/bin/python
  job_argv "$python"

  echo "#!/bin/bash"
  echo "# Rendered by launch/$SCRIPT_NAME; submit again with: sbatch THIS_FILE"
  echo "#SBATCH --job-name=$JOB_NAME"
  echo "#SBATCH --nodes=$NODES"
  echo "#SBATCH --ntasks-per-node=1"
  echo "#SBATCH --gpus-per-node=$GPUS_PER_NODE"
  echo "#SBATCH --time=$TIME_LIMIT"
  [[ -n $PARTITION ]] && echo "#SBATCH --partition=$PARTITION"
  [[ -n $ACCOUNT ]] && echo "#SBATCH --account=$ACCOUNT"
  [[ -n $CPUS_PER_TASK ]] && echo "#SBATCH --cpus-per-task=$CPUS_PER_TASK"
  echo "#SBATCH --output=$log_dir/%x-%j.out"
  if [[ $JOB == train ]]; then
    # SIGTERM to the tasks $RESUME_NOTICE s before the time limit: train saves a checkpoint and
    # exits with $EXIT_RESUME, and the job is requeued (below) to resume where it stopped.
    echo "#SBATCH --signal=TERM@$RESUME_NOTICE"
    echo "#SBATCH --requeue"
  fi
  local arg
  for arg in "${SBATCH_ARGS[@]}"; do
    echo "#SBATCH $arg"
  done
  echo "set -euo pipefail"
  echo "cd $(quote_one "$REPO_ROOT")"
  echo "export TF_FORCE_GPU_ALLOW_GROWTH=true"
  echo "export XLA_PYTHON_CLIENT_MEM_FRACTION=$(quote_one "$MEM_FRACTION")"
  # shellcheck disable=SC2016  # XLA_FLAGS of the job's environment, expanded on the node
  echo 'export XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }'"$GPU_XLA_FLAG\""
  local srun=(srun "--nodes=$NODES" --ntasks-per-node=1 --kill-on-bad-exit=1
    "--output=$log_dir/$JOB-%j-%N.log")
  if has_item "$JOB" "${COORDINATOR_JOBS[@]}"; then
    echo "# Process 0 (first node of the allocation) is the coordinator of jax.distributed."
    echo "COORDINATOR_HOST=\$(scontrol show hostnames \"\$SLURM_JOB_NODELIST\" | sed -n 1p)"
    echo "export COORDINATOR_ADDRESS=\"\$COORDINATOR_HOST:$PORT\""
    echo "# Each task adds its own cluster flags; \$SLURM_PROCID is only known inside the task."
    # shellcheck disable=SC2016  # expanded by each task's bash, not here
    srun+=(bash -c 'exec "$@" --coordinator_address="$COORDINATOR_ADDRESS" --num_processes="$SLURM_NTASKS" --process_id="$SLURM_PROCID"' stablerep-task)
  fi
  echo "rc=0"
  quote_args "${srun[@]}" "${JOB_ARGV[@]}"
  # shellcheck disable=SC2016  # $? of srun, expanded on the node
  echo ' || rc=$?'
  echo "# Exit code $EXIT_RESUME: stopped early (SIGTERM: preemption or the time limit) with a checkpoint."
  echo "if [ \"\$rc\" -eq $EXIT_RESUME ]; then"
  echo "  echo \"stopped early to be resumed (exit $EXIT_RESUME): requeueing job \$SLURM_JOB_ID\" >&2"
  echo "  scontrol requeue \"\$SLURM_JOB_ID\""
  echo "fi"
  echo "exit \"\$rc\""
}

main() {
  parse_args "$@"
  ((DRY_RUN)) && echo "# $SCRIPT_NAME --dry-run: nothing below is executed"
  print_line "cd $(quote_args "$REPO_ROOT")"
  cd "$REPO_ROOT"
  if ((INSTALL)); then
    local_install cuda12 "$VENV" ""
  elif ((!DRY_RUN)) && [[ ! -x $VENV/bin/python ]]; then
    die "no virtualenv at $VENV (drop --no-install to create it)"
  fi
  local script
  script=$(absolute "$LOG_DIR")/$JOB_NAME-$(date +%Y%m%d-%H%M%S).sbatch
  run mkdir -p "$(absolute "$LOG_DIR")"
  write_file "$script" "$(render_sbatch)"
  run sbatch "$script"
}

main "$@"
