#!/usr/bin/env bash
# Run one stablerep-jax job on every host of a Cloud TPU pod slice, from a workstation.
#
# Pod hosts must all run the same command at the same time (JAX finds the other hosts itself),
# so every step fans out with `gcloud compute tpus tpu-vm ... --worker=all`. With --retries the
# script waits for the job, and after a failure or a preempted slice it recreates the slice if
# needed and reruns the same command, which resumes from the checkpoints in --workdir.
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

SRC_ARCHIVE_NAME=stablerep-jax-src.tar.gz

usage() {
  cat <<EOF
Usage: $SCRIPT_NAME --name TPU --zone ZONE --job JOB [--config FILE[:PRESET]] [--workdir DIR]
       [options] [-- JOB_FLAGS...]

Steps: [create the slice] -> copy this checkout (or git clone --repo-url) to every worker ->
install '.[tpu]' into REMOTE_DIR/.venv on every worker -> run
'python -m stablerep_jax.JOB' on --worker=all, each host appending to
REMOTE_DIR/logs/JOB-\$(hostname).log -> [retry after preemption] -> [delete the slice].
Run it inside tmux/screen: it waits for the job.

Slice:
  --name NAME              TPU VM name (required)
  --zone ZONE              e.g. us-central2-b (required)
  --project PROJECT        default: gcloud's configured project
  --create                 create the slice if it does not exist (a preempted one is
                           deleted and created again); needs --accelerator-type
  --accelerator-type TYPE  e.g. v4-32, v5litepod-64
  --version VERSION        TPU software version (default tpu-ubuntu2204-base)
  --spot | --preemptible   create a Spot / preemptible slice
  --delete-after           delete the slice once the job has succeeded

Code:
  --repo-url URL           git clone URL on the workers instead of copying this checkout
  --branch BRANCH          branch or tag to clone (default main; with --repo-url)
  --remote-dir DIR         checkout on the workers, relative to the home directory
                           (default stablerep-jax)
  --no-install             skip the pip install on the workers

Job:
  --job JOB                one of: ${JOBS[*]}
  --config SPEC            config file[:preset] in the checkout (required except for demo)
  --workdir DIR            required for: ${WORKDIR_JOBS[*]}; use gs:// so every host sees it
  -- JOB_FLAGS...          everything after '--' goes to the job, e.g. --config.batch_size=512

Preemption:
  --retries N              after a failed attempt, a job that stopped early to be resumed
                           (exit 75: SIGTERM, checkpoint saved) or a slice that is no longer
                           READY, recreate it if needed (with --create) and rerun, up to N
                           times (default 0)
  --retry-wait SECONDS     pause before each retry (default 60)

Other:
  --dry-run                print every command (prefixed '+ ') and run nothing
  -h, --help               this help

Example:
  $SCRIPT_NAME --name sr-v4-64 --zone us-central2-b --create --accelerator-type v4-64 --spot \\
      --retries 5 --job train --config configs/stablerep.py:vit_b16_cc12m_1x \\
      --workdir gs://BUCKET/runs/b16_1x -- --config.data.train_files='gs://BUCKET/cc12m/*.tfrecord'
EOF
}

# Options (globals: the helpers below read them).
NAME=""
ZONE=""
PROJECT=""
CREATE=0
ACCELERATOR_TYPE=""
TPU_VERSION=tpu-ubuntu2204-base
PROVISIONING=""
DELETE_AFTER=0
REPO_URL=""
BRANCH=main
REMOTE_DIR=stablerep-jax
RETRIES=0
RETRY_WAIT=60
# --no-install sets INSTALL, defined in common.sh.

# parse_options handler: this script's own options.
pod_option() {
  case $1 in
    --name) require_value "$1" "${2-}"; NAME=$2; OPTION_WORDS=2 ;;
    --zone) require_value "$1" "${2-}"; ZONE=$2; OPTION_WORDS=2 ;;
    --project) require_value "$1" "${2-}"; PROJECT=$2; OPTION_WORDS=2 ;;
    --create) CREATE=1; OPTION_WORDS=1 ;;
    --accelerator-type) require_value "$1" "${2-}"; ACCELERATOR_TYPE=$2; OPTION_WORDS=2 ;;
    --version) require_value "$1" "${2-}"; TPU_VERSION=$2; OPTION_WORDS=2 ;;
    --spot | --preemptible)
      [[ -z $PROVISIONING || $PROVISIONING == "$1" ]] || die "--spot and --preemptible exclude each other"
      PROVISIONING=$1; OPTION_WORDS=1 ;;
    --delete-after) DELETE_AFTER=1; OPTION_WORDS=1 ;;
    --repo-url) require_value "$1" "${2-}"; REPO_URL=$2; OPTION_WORDS=2 ;;
    --branch) require_value "$1" "${2-}"; BRANCH=$2; OPTION_WORDS=2 ;;
    --remote-dir) require_value "$1" "${2-}"; REMOTE_DIR=$2; OPTION_WORDS=2 ;;
    --no-install) INSTALL=0; OPTION_WORDS=1 ;;
    --retries) require_value "$1" "${2-}"; require_uint "$1" "$2"; RETRIES=$2; OPTION_WORDS=2 ;;
    --retry-wait) require_value "$1" "${2-}"; require_uint "$1" "$2"; RETRY_WAIT=$2; OPTION_WORDS=2 ;;
  esac
}

parse_args() {
  parse_options pod_option "$@"
  [[ -n $NAME ]] || die "missing required option --name (the TPU VM name)"
  [[ $NAME =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] || die "--name '$NAME' is not a valid TPU name (lowercase letters, digits, '-')"
  [[ -n $ZONE ]] || die "missing required option --zone (e.g. us-central2-b)"
  if ((CREATE)); then
    [[ -n $ACCELERATOR_TYPE ]] || die "--create needs --accelerator-type (e.g. v4-32)"
  elif [[ -n $ACCELERATOR_TYPE || -n $PROVISIONING ]]; then
    die "--accelerator-type, --spot and --preemptible only apply with --create"
  fi
  [[ $REMOTE_DIR != "~"* ]] || die "--remote-dir is relative to the home directory already; drop the '~'"
  check_job_options
  [[ -n $REPO_URL ]] || check_config_file
  if ((RETRIES > 0 && !CREATE)); then
    log "note: without --create a preempted slice cannot be recreated; retries only rerun on a READY slice"
  fi
}

# tpu SUBCOMMAND ARG...: a `gcloud compute tpus tpu-vm` command on this slice's zone/project.
tpu() {
  local scope=("--zone=$ZONE")
  [[ -n $PROJECT ]] && scope+=("--project=$PROJECT")
  run gcloud compute tpus tpu-vm "$1" "${@:2}" "${scope[@]}"
}

# on_workers SNIPPET [GCLOUD_FLAG...]: a shell snippet on every worker of the slice.
on_workers() {
  local snippet=$1
  shift
  tpu ssh "$NAME" --worker=all "$@" "--command=$snippet"
}

# slice_state: SLICE_STATE = READY / PREEMPTED / ... or empty when the slice does not exist.
slice_state() {
  local scope=("--zone=$ZONE") err
  [[ -n $PROJECT ]] && scope+=("--project=$PROJECT")
  local cmd=(gcloud compute tpus tpu-vm describe "$NAME" "${scope[@]}" "--format=value(state)")
  print_line "$(quote_args "${cmd[@]}")"
  SLICE_STATE=""
  ((DRY_RUN)) && return 0
  err=$(mktemp)
  SLICE_STATE=$("${cmd[@]}" 2>"$err") || SLICE_STATE=""
  if [[ -z $SLICE_STATE && -s $err ]]; then
    log "describe $NAME: $(tail -n 1 "$err") (taken as: no such slice)"
  fi
  rm -f "$err"
  log "slice $NAME: ${SLICE_STATE:-absent}"
}

create_slice() {
  local args=("$NAME" "--accelerator-type=$ACCELERATOR_TYPE" "--version=$TPU_VERSION")
  [[ -n $PROVISIONING ]] && args+=("$PROVISIONING")
  tpu create "${args[@]}"
}

delete_slice() {
  tpu delete "$NAME" --quiet
}

# Replaces a slice that is not READY (deleting it first unless it is gone).
recreate_slice() {
  if ((DRY_RUN)); then
    if ((CREATE)); then
      echo "# if the slice is not READY: delete it (unless it is gone) and create it again"
      delete_slice
      create_slice
    else
      echo "# if the slice is not READY: stop (without --create it is not recreated)"
    fi
    return 0
  fi
  [[ $SLICE_STATE == READY ]] && return 0
  ((CREATE)) || {
    log "slice $NAME in $ZONE is ${SLICE_STATE:-absent}; pass --create --accelerator-type TYPE to (re)create it"
    exit 2
  }
  [[ -n $SLICE_STATE ]] && delete_slice
  create_slice
}

# The checkout as a tarball of the files git would commit (tracked + untracked, not ignored).
make_source_archive() {
  if ((DRY_RUN)); then
    SRC_TMP=${TMPDIR:-/tmp}/stablerep-jax-launch.XXXXXX
  else
    git -C "$REPO_ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1 ||
      die "$REPO_ROOT is not a git checkout; pass --repo-url URL to clone on the workers instead"
    SRC_TMP=$(mktemp -d "${TMPDIR:-/tmp}/stablerep-jax-launch.XXXXXX")
    trap 'rm -rf "$SRC_TMP"' EXIT
  fi
  run_to "$SRC_TMP/files" git -C "$REPO_ROOT" ls-files -z --cached --others --exclude-standard -- . ':(exclude)logs'
  run tar -czf "$SRC_TMP/$SRC_ARCHIVE_NAME" -C "$REPO_ROOT" --null -T "$SRC_TMP/files"
}

# Puts the code on every worker and installs it.
setup_workers() {
  local dir
  dir=$(quote_one "$REMOTE_DIR")
  if [[ -n $REPO_URL ]]; then
    local url branch
    url=$(quote_one "$REPO_URL")
    branch=$(quote_one "$BRANCH")
    on_workers "if [ -d $dir/.git ]; then git -C $dir fetch --depth 1 origin $branch && git -C $dir checkout --force FETCH_HEAD; else git clone --depth 1 --branch $branch $url $dir; fi"
  else
    [[ -n ${SRC_TMP-} ]] || make_source_archive
    tpu scp "$SRC_TMP/$SRC_ARCHIVE_NAME" "$NAME:$SRC_ARCHIVE_NAME" --worker=all
    on_workers "mkdir -p $dir && tar -xzf $SRC_ARCHIVE_NAME -C $dir && rm -f $SRC_ARCHIVE_NAME"
  fi
  if ((INSTALL)); then
    on_workers "cd $dir && (python3 -m venv .venv || (sudo apt-get update -q && sudo apt-get install -y -q python3-venv && python3 -m venv --clear .venv)) && .venv/bin/python -m pip install -q --upgrade pip && .venv/bin/python -m pip install -q -e $(quote_one '.[tpu]')"
  fi
}

# The job on every worker, in the foreground of the ssh session. A leftover process of an
# earlier attempt (its pid in logs/JOB.pid) would hold the TPU, so it is stopped first.
run_job_on_workers() {
  local dir pid_file
  dir=$(quote_one "$REMOTE_DIR")
  pid_file="logs/$JOB.pid"
  job_argv .venv/bin/python
  local stop_previous="if [ -f $pid_file ]; then p=\$(cat $pid_file); if kill -0 \"\$p\" 2>/dev/null && grep -qa stablerep_jax /proc/\$p/cmdline; then echo \"stopping the earlier run, pid \$p\" >&2; kill \"\$p\" || true; for _ in \$(seq 120); do kill -0 \"\$p\" 2>/dev/null || break; sleep 1; done; kill -9 \"\$p\" 2>/dev/null || true; fi; fi"
  on_workers "set -e; cd $dir; mkdir -p logs; $stop_previous; echo \$\$ > $pid_file; exec $(quote_args "${JOB_ARGV[@]}") >> logs/$JOB-\$(hostname).log 2>&1" \
    --ssh-flag=-oServerAliveInterval=60
}

main() {
  parse_args "$@"
  ((DRY_RUN)) && echo "# $SCRIPT_NAME --dry-run: nothing below is executed"

  slice_state
  if ((CREATE)); then
    recreate_slice
  elif ((!DRY_RUN)) && [[ $SLICE_STATE != READY ]]; then
    die "TPU slice '$NAME' in $ZONE is ${SLICE_STATE:-absent}; pass --create --accelerator-type TYPE to create it"
  fi
  setup_workers

  local attempt=1 rc
  while :; do
    echo "# attempt $attempt of $((RETRIES + 1)); logs: $REMOTE_DIR/logs/$JOB-\$(hostname).log on each worker"
    rc=0
    run_job_on_workers || rc=$?
    if ((DRY_RUN)); then
      if ((RETRIES > 0)); then
        echo "# if the attempt fails or the slice is no longer READY, up to $RETRIES more attempts, each:"
        slice_state
        recreate_slice
        if ((CREATE)); then
          echo "# and, on a recreated slice, copy and install again:"
          setup_workers
        fi
        run sleep "$RETRY_WAIT"
        echo "# the same command again: it resumes from the checkpoints in the workdir"
        run_job_on_workers
      fi
      break
    fi
    if ((RETRIES > 0)); then
      slice_state   # a graceful stop on preemption can exit 0 before the job is done
      if ((rc == 0)) && [[ $SLICE_STATE != READY ]]; then
        log "the job exited 0 but the slice is ${SLICE_STATE:-absent}: treating it as preempted"
        rc=1
      fi
    fi
    ((rc == 0)) && break
    if ((rc == EXIT_RESUME)); then
      log "$JOB stopped early to be resumed (exit $EXIT_RESUME: SIGTERM, checkpoint saved)"
    fi
    if ((attempt > RETRIES)); then
      log "$JOB failed on $NAME (exit $rc) after $attempt attempt(s); see $REMOTE_DIR/logs/$JOB-*.log on the workers"
      exit "$rc"
    fi
    log "attempt $attempt failed (exit $rc); retrying ($((RETRIES - attempt + 1)) left)"
    attempt=$((attempt + 1))
    if [[ $SLICE_STATE != READY ]]; then
      recreate_slice
      setup_workers
    fi
    run sleep "$RETRY_WAIT"
  done
  ((DRY_RUN)) || log "$JOB finished on $NAME"
  if ((DELETE_AFTER)); then
    delete_slice
  fi
}

main "$@"
