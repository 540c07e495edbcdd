#!/usr/bin/env bash
# Runs one stablerep-jax job on this host of a SkyPilot cluster: the `run:` of launch/*.yaml.
#
#   bash launch/run_job.sh JOB [JOB_FLAGS...]
#
# The package checks JOB (python -m stablerep_jax.jobs). With JAX_CLUSTER=skypilot (GPU nodes)
# and several hosts, a job that takes the multi-process flags gets them from SkyPilot: process 0
# (the coordinator) is the first of $SKYPILOT_NODE_IPS, this process is $SKYPILOT_NODE_RANK.
# With JAX_CLUSTER=auto (the default; TPU pods) JAX finds the hosts itself. The job's exit code is
# this script's: 75 (stopped early after SIGTERM, checkpoint saved) is in the task's
# job_recovery.recover_on_exit_codes, so SkyPilot restarts the task and this same command
# resumes from the job's --workdir.
set -euo pipefail

PYTHON=${PYTHON:-python3}
job=${1:?usage: run_job.sh JOB [JOB_FLAGS...]}
shift

mode=$("$PYTHON" -m stablerep_jax.jobs "$job")   # exits 2 naming the jobs for an unknown one
cluster=()
mapfile -t ips < <(printf '%s\n' "${SKYPILOT_NODE_IPS:-}" | sed '/^[[:space:]]*$/d')
case ${JAX_CLUSTER:=auto} in
  auto | skypilot) ;;
  *) echo "run_job.sh: error: JAX_CLUSTER must be auto or skypilot, got '$JAX_CLUSTER'" >&2; exit 2 ;;
esac
if [[ $JAX_CLUSTER == skypilot && ${#ips[@]} -gt 1 ]]; then
  if [[ $mode != cluster-flags ]]; then
    echo "run_job.sh: error: $job takes no --coordinator_address, so it cannot run on ${#ips[@]} nodes with JAX_CLUSTER=skypilot" >&2
    exit 2
  fi
  cluster=("--coordinator_address=${ips[0]}:${COORDINATOR_PORT:-12345}"
           "--num_processes=${#ips[@]}" "--process_id=${SKYPILOT_NODE_RANK:?SKYPILOT_NODE_RANK is not set}")
fi

# exec: the job takes this process's place (same pid, same process group). A SIGTERM sent to
# this script, or to its whole process group as systemd, containers and some schedulers send it,
# reaches the job exactly once, and the job's own exit code (75 = stablerep_jax.cli.EXIT_RESUME
# after saving) is what the caller sees; a shell left waiting would die of the signal and report
# 143. The job itself logs "stopped early to be resumed (exit code 75)" (stablerep_jax.cli).
exec "$PYTHON" -m "stablerep_jax.$job" "$@" "${cluster[@]}"
