#!/usr/bin/env bash
# Install stablerep-jax on a single-host Cloud TPU VM and run one job there.
# (A pod slice needs the same command on every host at once: use tpu_pod.sh from a workstation.)
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
Usage: $SCRIPT_NAME --job JOB [--config FILE[:PRESET]] [--workdir DIR] [options] [-- JOB_FLAGS...]

Run on the TPU VM itself, from anywhere in the checkout: creates .venv, installs
'.[tpu]' into it, and starts 'python -m stablerep_jax.JOB' in the background (nohup) with
its output appended to logs/JOB-\$(hostname).log. Rerunning a train command resumes from
the checkpoints in --workdir.

Job:
  --job JOB            one of: ${JOBS[*]}
  --config SPEC        config file[:preset], e.g. configs/stablerep.py:vit_b16_cc12m_1x
                       (required except for demo)
  --workdir DIR        required for: ${WORKDIR_JOBS[*]} (local path or gs://)
  -- JOB_FLAGS...      everything after '--' goes to the job, e.g. --config.batch_size=512

Options:
$(local_options_help)

Example:
  $SCRIPT_NAME --job train --config configs/stablerep.py:vit_b16_cc12m_1x \\
      --workdir gs://BUCKET/runs/b16_1x -- --config.data.train_files='gs://BUCKET/cc12m/*.tfrecord'
EOF
}

main() {
  parse_options local_option "$@"
  check_local_options
  prepare_local_run tpu
  start_local_job
}

main "$@"
