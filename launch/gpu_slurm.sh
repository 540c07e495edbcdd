#!/usr/bin/env bash
# Render an sbatch script that runs one stablerep-jax job over several GPU nodes, and submit it.
#
# Layout: one process per node (srun --ntasks-per-node=1), each driving all of its node's GPUs:
# JAX's usual multi-host layout (one tf.data pipeline and one file slice per host, NCCL within a
# node). Process 0 runs on the first node of the allocation and is the coordinator.
set -euo pipefail

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SCRIPT_NAME=$(basename "$0")
EXIT_RESUME=75   # stablerep_jax/cli.py EXIT_RESUME: stopped early after SIGTERM, rerun to resume
GPU_XLA_FLAG="--xla_gpu_enable_latency_hiding_scheduler=true"   # collectives overlap compute

usage() {
  cat <<EOF
Usage: $SCRIPT_NAME --job JOB --config FILE[:PRESET] [--workdir DIR] [options] [-- JOB_FLAGS...]

Run on a SLURM login node, from a checkout on a file system the compute nodes share. Installs
'.[cuda12]' into --venv (once), writes LOG_DIR/JOB_NAME-TIMESTAMP.sbatch and submits it. A job
that takes them (python -m stablerep_jax.jobs JOB) gets, in each task,
  --coordinator_address=<first host of \$SLURM_JOB_NODELIST>:PORT
  --num_processes=\$SLURM_NTASKS --process_id=\$SLURM_PROCID
Exit $EXIT_RESUME (train saved a checkpoint after SIGTERM) requeues the job; it resumes from --workdir.

  --job JOB --config SPEC --workdir DIR   the job (python -m stablerep_jax.jobs lists them);
                         --workdir where it needs one (jobs --requires-workdir JOB)
  --nodes N (1)  --gpus-per-node G (8)  --time T (24:00:00)  --partition P  --account A
  --cpus-per-task N  --job-name NAME (stablerep-JOB)  --port PORT (12345)
  --sbatch-arg ARG       one more '#SBATCH ARG' line (repeatable), e.g. --sbatch-arg=--exclusive
  --mem-fraction F       XLA_PYTHON_CLIENT_MEM_FRACTION (default: the environment's, else .90)
  --venv DIR (.venv)  --log-dir DIR (logs)  --no-install
  --dry-run              print every command and the sbatch script (prefixed '+ '), run nothing
EOF
}

die() {
  echo "$SCRIPT_NAME: error: $*" >&2
  exit 2
}

# need_value OPTION VALUE [REGEX]: VALUE is given (and matches REGEX).
need_value() {
  [[ -n ${2-} && ${2-} != --* ]] || die "option $1 needs a value"
  [[ -z ${3-} || $2 =~ $3 ]] || die "option $1: $(quote_one "$2") is not valid"
}

# sbatch_word OPTION VALUE: VALUE may go on an #SBATCH line (empty: option not given).
sbatch_word() {
  [[ -z $2 || $2 =~ ^[A-Za-z0-9._,:+=@-]+$ ]] \
    || die "$1 $(quote_one "$2") may only hold letters, digits and . _ , : + = @ - (it goes on an #SBATCH line)"
}

absolute() {
  if [[ $1 == /* ]]; then printf '%s' "$1"; else printf '%s' "$REPO_ROOT/$1"; fi
}

# quote_one ARG: ARG as bash reads it back; 'ARG' where that is enough (easier to read).
quote_one() {
  local q
  q=$(printf '%q' "$1")
  if [[ $q == "$1" || $q == "\$'"* || $1 == *"'"* ]]; then printf '%s' "$q"; else printf "'%s'" "$1"; fi
}

quote_args() {
  local out="" arg
  for arg in "$@"; do out+="$(quote_one "$arg") "; done
  printf '%s' "${out% }"
}

# run ARG...: print the command as '+ ARGV', then (unless --dry-run) execute it.
run() {
  printf '+ %s\n' "$(quote_args "$@")"
  ((DRY_RUN)) || "$@"
}

JOB="" CONFIG="" WORKDIR="" DRY_RUN=0 INSTALL=1 VENV=.venv LOG_DIR=logs
NODES=1 GPUS_PER_NODE=8 TIME_LIMIT=24:00:00 PARTITION="" ACCOUNT="" CPUS_PER_TASK=""
JOB_NAME="" PORT=12345 MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-.90}
SBATCH_ARGS=() PASSTHROUGH=()
RESUME_NOTICE=300   # seconds of SIGTERM notice before the time limit (train: save, exit, requeue)

parse_args() {
  local uint='^[0-9]+$'
  while (($#)); do
    if [[ $1 =~ ^(--[a-z][a-z-]*)=(.*)$ ]]; then   # --name=value as --name value
      set -- "${BASH_REMATCH[1]}" "${BASH_REMATCH[2]}" "${@:2}"
    fi
    case $1 in
      -h | --help) usage; exit 0 ;;
      --dry-run) DRY_RUN=1; shift; continue ;;
      --no-install) INSTALL=0; shift; continue ;;
      --) shift; PASSTHROUGH=("$@"); break ;;
      --job) need_value "$1" "${2-}"; JOB=$2 ;;
      --config) need_value "$1" "${2-}"; CONFIG=$2 ;;
      --workdir) need_value "$1" "${2-}"; WORKDIR=$2 ;;
      --nodes) need_value "$1" "${2-}" "$uint"; NODES=$2 ;;
      --gpus-per-node) need_value "$1" "${2-}" "$uint"; GPUS_PER_NODE=$2 ;;
      --time) need_value "$1" "${2-}" '^[0-9:-]+$'; TIME_LIMIT=$2 ;;
      --partition) need_value "$1" "${2-}"; PARTITION=$2 ;;
      --account) need_value "$1" "${2-}"; ACCOUNT=$2 ;;
      --cpus-per-task) need_value "$1" "${2-}" "$uint"; CPUS_PER_TASK=$2 ;;
      --job-name) need_value "$1" "${2-}" '^[A-Za-z0-9._-]+$'; JOB_NAME=$2 ;;
      --sbatch-arg) [[ ${2-} == -* && ${2-} != *$'\n'* ]] \
          || die "--sbatch-arg $(quote_one "${2-}") must be one sbatch option such as --exclusive"
        SBATCH_ARGS+=("$2") ;;
      --port) need_value "$1" "${2-}" "$uint"; PORT=$2 ;;
      --mem-fraction) need_value "$1" "${2-}" '^(0?\.[0-9]+|1(\.0*)?)$'; MEM_FRACTION=$2 ;;
      --venv) need_value "$1" "${2-}"; VENV=$2 ;;
      --log-dir) need_value "$1" "${2-}"; LOG_DIR=$2 ;;
      --config.* | --workdir*) die "unknown option '$1': flags for the job itself go after '--' (e.g. -- $1)" ;;
      *) die "unknown option '$1'" ;;
    esac
    shift 2
  done
}

check_args() {
  [[ -n $JOB ]] || die "missing required option --job ($(PYTHONPATH=$REPO_ROOT python3 -m stablerep_jax.jobs | xargs))"
  # The package knows its jobs and which of them take the coordinator flags.
  MODE=$(PYTHONPATH=$REPO_ROOT python3 -m stablerep_jax.jobs "$JOB" 2>&1) || die "--job: ${MODE#*error: }"
  [[ -n $CONFIG || $JOB == demo ]] || die "missing required option --config (demo alone embeds one)"
  [[ -z $CONFIG || $CONFIG == /* || -f $REPO_ROOT/${CONFIG%%:*} ]] \
    || die "config file '${CONFIG%%:*}' (from --config $CONFIG) not found under $REPO_ROOT"
  [[ -n $WORKDIR || $(PYTHONPATH=$REPO_ROOT python3 -m stablerep_jax.jobs --requires-workdir "$JOB") == no ]] \
    || die "missing required option --workdir for --job $JOB"
  ((NODES >= 1 && GPUS_PER_NODE >= 1)) || die "--nodes and --gpus-per-node must be at least 1"
  ((PORT >= 1024 && PORT <= 65535)) || die "--port must be in 1024-65535, got $PORT"
  [[ -n $JOB_NAME ]] || JOB_NAME=stablerep-$JOB
  # Values on '#SBATCH' lines: a newline would start a line (or command), a space end the option.
  sbatch_word --partition "$PARTITION"
  sbatch_word --account "$ACCOUNT"
  [[ $(absolute "$LOG_DIR") != *[[:space:]]* ]] \
    || die "--log-dir $(quote_one "$(absolute "$LOG_DIR")") holds whitespace, which the '#SBATCH --output' line cannot carry"
}

# The sbatch script, on stdout. Values are quoted for bash; $SLURM_* expand on the nodes.
render_sbatch() {
  local log_dir job_argv arg
  log_dir=$(absolute "$LOG_DIR")
  job_argv=("$(absolute "$VENV")/bin/python" -m "stablerep_jax.$JOB")
  [[ -n $CONFIG ]] && job_argv+=("--config=$CONFIG")
  [[ -n $WORKDIR ]] && job_argv+=("--workdir=$WORKDIR")
  job_argv+=("${PASSTHROUGH[@]}")
  echo "#!/bin/bash"
  echo "# Rendered by launch/$SCRIPT_NAME; submit again with: sbatch THIS_FILE"
  printf '#SBATCH %s\n' "--job-name=$JOB_NAME" "--nodes=$NODES" --ntasks-per-node=1 \
    "--gpus-per-node=$GPUS_PER_NODE" "--time=$TIME_LIMIT" "--output=$log_dir/%x-%j.out" \
    ${PARTITION:+"--partition=$PARTITION"} ${ACCOUNT:+"--account=$ACCOUNT"} \
    ${CPUS_PER_TASK:+"--cpus-per-task=$CPUS_PER_TASK"}
  # SIGTERM $RESUME_NOTICE s before the time limit: train saves, exits $EXIT_RESUME, is requeued.
  [[ $JOB == train ]] && printf '#SBATCH %s\n' "--signal=TERM@$RESUME_NOTICE" --requeue
  for arg in "${SBATCH_ARGS[@]}"; do echo "#SBATCH $arg"; done
  echo "set -euo pipefail"
  echo "cd $(quote_one "$REPO_ROOT")"
  echo "export TF_FORCE_GPU_ALLOW_GROWTH=true"
  echo "export XLA_PYTHON_CLIENT_MEM_FRACTION=$(quote_one "$MEM_FRACTION")"
  # shellcheck disable=SC2016  # XLA_FLAGS of the job's environment, expanded on the node
  echo 'export XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }'"$GPU_XLA_FLAG\""
  local srun=(srun "--nodes=$NODES" --ntasks-per-node=1 --kill-on-bad-exit=1
    "--output=$log_dir/$JOB-%j-%N.log")
  if [[ $MODE == cluster-flags ]]; then
    echo "# Process 0 (first node of the allocation) is the coordinator of jax.distributed."
    echo "COORDINATOR_HOST=\$(scontrol show hostnames \"\$SLURM_JOB_NODELIST\" | sed -n 1p)"
    echo "export COORDINATOR_ADDRESS=\"\$COORDINATOR_HOST:$PORT\""
    # shellcheck disable=SC2016  # expanded by each task's bash: $SLURM_PROCID is only known there
    srun+=(bash -c 'exec "$@" --coordinator_address="$COORDINATOR_ADDRESS" --num_processes="$SLURM_NTASKS" --process_id="$SLURM_PROCID"' stablerep-task)
  fi
  echo "rc=0"
  # shellcheck disable=SC2016  # $? of srun, expanded on the node
  echo "$(quote_args "${srun[@]}" "${job_argv[@]}")"' || rc=$?'
  echo "if [ \"\$rc\" -eq $EXIT_RESUME ]; then"
  echo "  echo \"stopped early to be resumed (exit $EXIT_RESUME): requeueing job \$SLURM_JOB_ID\" >&2"
  echo "  scontrol requeue \"\$SLURM_JOB_ID\""
  echo "fi"
  echo "exit \"\$rc\""
}

main() {
  parse_args "$@"
  check_args
  ((DRY_RUN)) && echo "# $SCRIPT_NAME --dry-run: nothing below is executed"
  cd "$REPO_ROOT"
  if ((INSTALL)); then
    run python3 -m venv "$VENV"
    run "$VENV/bin/python" -m pip install -e ".[cuda12]"
  elif ((!DRY_RUN)) && [[ ! -x $VENV/bin/python ]]; then
    die "no virtualenv at $VENV (drop --no-install to create it)"
  fi
  local script content
  script=$(absolute "$LOG_DIR")/$JOB_NAME-$(date +%Y%m%d-%H%M%S).sbatch
  content=$(render_sbatch)
  printf '+ cat > %s <<'"'EOF'"'\n%s\nEOF\n' "$(quote_one "$script")" "$content"
  if ((!DRY_RUN)); then
    mkdir -p "$(dirname "$script")"
    printf '%s\n' "$content" >"$script.tmp.$$" && mv "$script.tmp.$$" "$script"
  fi
  run sbatch "$script"
}

main "$@"
