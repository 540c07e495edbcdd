#!/usr/bin/env bash
# Install stablerep-jax with jax[cuda12] on one GPU machine and run one job on its GPUs.
# One process drives every visible GPU; TensorFlow (tf.data only) is kept off them.
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
Usage: $SCRIPT_NAME --job JOB [--config FILE[:PRESET]] [--workdir DIR] [options] [-- JOB_FLAGS...]

Creates .venv, installs '.[cuda12]' (jax[cuda12]) into it and starts
'python -m stablerep_jax.JOB' in the background (nohup), output appended to
logs/JOB-\$(hostname).log. The job uses every GPU in CUDA_VISIBLE_DEVICES (all if unset).
Exported for the job: TF_FORCE_GPU_ALLOW_GROWTH=true (the job also hides the GPUs from
TensorFlow), XLA_PYTHON_CLIENT_MEM_FRACTION (default .90: JAX preallocates 90% of each GPU,
leaving room for cuDNN/NCCL workspaces) and XLA_FLAGS += $GPU_XLA_FLAG.

Job:
  --job JOB            one of: ${JOBS[*]}
  --config SPEC        config file[:preset], e.g. configs/stablerep.py:vit_b16_cc12m_1x
                       (required except for demo)
  --workdir DIR        required for: ${WORKDIR_JOBS[*]}
  -- JOB_FLAGS...      everything after '--' goes to the job, e.g. --config.batch_size=512

Options:
  --gpus LIST          set CUDA_VISIBLE_DEVICES=LIST (e.g. 0,1,2,3); default: keep the
                       environment's value
  --mem-fraction F     XLA_PYTHON_CLIENT_MEM_FRACTION (default: the environment's, else .90)
$(local_options_help)

Example:
  $SCRIPT_NAME --gpus 0,1,2,3 --job train --config configs/stablerep.py:vit_s16_cc12m_1x \\
      --workdir runs/s16 -- --config.data.train_files='data/cc12m/*.tfrecord' --config.batch_size=256
EOF
}

GPUS=""
MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-.90}

# parse_options handler: --gpus and --mem-fraction, then the options shared with tpu_vm.sh.
gpu_option() {
  case $1 in
    --gpus)
      require_value "$1" "${2-}"
      [[ $2 =~ ^[0-9]+(,[0-9]+)*$ ]] || die "--gpus needs a comma-separated list of GPU indices, got '$2'"
      GPUS=$2; OPTION_WORDS=2 ;;
    --mem-fraction) require_value "$1" "${2-}"; require_fraction "$1" "$2"; MEM_FRACTION=$2; OPTION_WORDS=2 ;;
    *) local_option "$@" ;;
  esac
}

main() {
  parse_options gpu_option "$@"
  check_local_options
  prepare_local_run cuda12
  if [[ -n $GPUS ]]; then
    run_export CUDA_VISIBLE_DEVICES "$GPUS"
  elif [[ -n ${CUDA_VISIBLE_DEVICES+set} ]]; then
    echo "# CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES} (from the environment)"
  fi
  run_export TF_FORCE_GPU_ALLOW_GROWTH true
  run_export XLA_PYTHON_CLIENT_MEM_FRACTION "$MEM_FRACTION"
  run_export XLA_FLAGS "$(gpu_xla_flags "${XLA_FLAGS:-}")"
  start_local_job
}

main "$@"
