# shellcheck shell=bash
# Helpers shared by the launch scripts: strict option parsing, dry-run printing, job commands.
#
# Sourced, never run. One place builds the `python -m stablerep_jax.<job>` command line so the
# four scripts (and their tests) agree on it. Every command goes through `run`, which prints it
# as `+ <shell-quoted argv>` first, so `--dry-run` shows exactly what a real run executes.

if ((BASH_VERSINFO[0] < 4 || (BASH_VERSINFO[0] == 4 && BASH_VERSINFO[1] < 4))); then
  echo "error: the launch scripts need bash >= 4.4 (this is $BASH_VERSION); on macOS: brew install bash" >&2
  exit 2
fi

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SCRIPT_NAME=$(basename "$0")

# Jobs (DESIGN.md), the ones that take --workdir, and the ones that take explicit cluster flags.
JOBS=(generate train linear_probe import_images convert demo)
WORKDIR_JOBS=(train linear_probe demo)
# shellcheck disable=SC2034  # read by gpu_slurm.sh
COORDINATOR_JOBS=(train)
# Jobs that may run without --config (they embed a default).
DEFAULT_CONFIG_JOBS=(demo)

# The exit code of a job that stopped early on purpose (SIGTERM) after saving its state: run the
# same command again to resume (stablerep_jax/cli.py EXIT_RESUME; EX_TEMPFAIL of sysexits.h).
# shellcheck disable=SC2034  # read by the scripts
EXIT_RESUME=75

# The only GPU XLA flag we set by default: long-standing, and it overlaps collectives with compute.
GPU_XLA_FLAG="--xla_gpu_enable_latency_hiding_scheduler=true"

# Options every script shares; the scripts set them through `set_job_option`.
DRY_RUN=0
JOB=""
CONFIG=""
WORKDIR=""
PASSTHROUGH=()

# Options of the scripts that run the job on this machine (tpu_vm.sh, gpu_single.sh), set by
# `local_option`; gpu_slurm.sh and tpu_pod.sh set INSTALL (and VENV) with options of their own.
FOREGROUND=0
INSTALL=1
VENV=.venv
PYTHON_EXE=""
LOG_FILE=""

die() {
  echo "$SCRIPT_NAME: error: $*" >&2
  echo "Run '$SCRIPT_NAME --help' for the options." >&2
  exit 2
}

log() {
  echo "[$SCRIPT_NAME] $*" >&2
}

has_item() {
  local needle=$1 item
  shift
  for item in "$@"; do
    [[ $item == "$needle" ]] && return 0
  done
  return 1
}

# Splits `--name=value` into `--name value` before `--`, so both spellings parse the same way.
# Job flags (`--config.key=value`) are left whole, to be rejected with a hint by unknown_option.
# Result in NORMALIZED_ARGS.
normalize_args() {
  NORMALIZED_ARGS=()
  while (($#)); do
    if [[ $1 == -- ]]; then
      NORMALIZED_ARGS+=("$@")
      return
    fi
    if [[ $1 =~ ^(--[a-z][a-z0-9-]*)=(.*)$ ]]; then
      NORMALIZED_ARGS+=("${BASH_REMATCH[1]}" "${BASH_REMATCH[2]}")
    else
      NORMALIZED_ARGS+=("$1")
    fi
    shift
  done
}

# require_value OPTION VALUE: an option that takes a value got one.
require_value() {
  [[ -n ${2-} && ${2-} != --* ]] || die "option $1 needs a value"
}

require_uint() {
  [[ $2 =~ ^[0-9]+$ ]] || die "option $1 needs a non-negative integer, got '$2'"
}

# require_fraction OPTION VALUE: a number in (0, 1], e.g. for XLA_PYTHON_CLIENT_MEM_FRACTION.
require_fraction() {
  [[ $2 =~ ^(0?\.[0-9]+|1(\.0*)?)$ ]] || die "$1 needs a number in (0, 1], got '$2'"
}

unknown_option() {
  case $1 in
    --config.* | --workdir* | --config=*)
      die "unknown option '$1': flags for the job itself go after '--' (e.g. -- $1)" ;;
    -*) die "unknown option '$1'" ;;
    *) die "unexpected argument '$1' (job flags go after '--')" ;;
  esac
}

# set_job_option OPTION VALUE: --job / --config / --workdir, shared by every script.
set_job_option() {
  require_value "$1" "${2-}"
  case $1 in
    --job)
      has_item "$2" "${JOBS[@]}" || die "--job must be one of: ${JOBS[*]} (got '$2')"
      JOB=$2 ;;
    --config) CONFIG=$2 ;;
    --workdir) WORKDIR=$2 ;;
  esac
}

# parse_options HANDLER ARG...: the option loop of every script, after normalize_args. It
# handles -h/--help, --job/--config/--workdir, --dry-run and '--'; any other option goes to
# `HANDLER ARG...` (ARG... = the words left), which sets OPTION_WORDS to the number of words it
# used, and leaves it 0 for an option it does not know (then unknown_option rejects it).
parse_options() {
  local handler=$1
  shift
  normalize_args "$@"
  set -- "${NORMALIZED_ARGS[@]}"
  while (($#)); do
    case $1 in
      -h | --help) usage; exit 0 ;;
      --job | --config | --workdir) set_job_option "$1" "${2-}"; shift 2 ;;
      --dry-run) DRY_RUN=1; shift ;;
      --) shift; PASSTHROUGH=("$@"); break ;;
      *)
        OPTION_WORDS=0
        "$handler" "$@"
        ((OPTION_WORDS)) || unknown_option "$1"
        shift "$OPTION_WORDS" ;;
    esac
  done
}

# local_option ARG...: a parse_options handler for the options of the scripts that run the job
# on this machine (--foreground --log-file --venv --python --no-install).
local_option() {
  case $1 in
    --foreground) FOREGROUND=1; OPTION_WORDS=1 ;;
    --log-file) require_value "$1" "${2-}"; LOG_FILE=$2; OPTION_WORDS=2 ;;
    --venv) require_value "$1" "${2-}"; VENV=$2; OPTION_WORDS=2 ;;
    --python) require_value "$1" "${2-}"; PYTHON_EXE=$2; OPTION_WORDS=2 ;;
    --no-install) INSTALL=0; OPTION_WORDS=1 ;;
  esac
}

# The help lines of the options above (and --dry-run, -h), for the usage of those scripts.
local_options_help() {
  cat <<'EOF'
  --foreground         wait for the job, output on the terminal as well as in the log;
                       the job's exit status becomes this script's
  --log-file PATH      log file, relative to the checkout (default logs/JOB-$(hostname).log)
  --venv DIR           virtualenv to create and use (default .venv)
  --python PATH        run with this interpreter instead of a virtualenv
  --no-install         skip the install (venv + pip), run what is installed
  --dry-run            print every command (prefixed '+ ') and run nothing
  -h, --help           this help
EOF
}

# Checks the combination of job options once parsing is done.
check_job_options() {
  [[ -n $JOB ]] || die "missing required option --job (one of: ${JOBS[*]})"
  if [[ -z $CONFIG ]] && ! has_item "$JOB" "${DEFAULT_CONFIG_JOBS[@]}"; then
    die "missing required option --config (e.g. --config configs/stablerep.py:tiny) for --job $JOB"
  fi
  if has_item "$JOB" "${WORKDIR_JOBS[@]}"; then
    [[ -n $WORKDIR ]] || die "missing required option --workdir for --job $JOB"
  elif [[ -n $WORKDIR ]]; then
    die "--job $JOB takes no --workdir (it writes where its config says, e.g. -- --config.output_dir=DIR)"
  fi
  local arg
  for arg in "${PASSTHROUGH[@]}"; do
    case $arg in
      --workdir | --workdir=*) die "pass --workdir to $SCRIPT_NAME itself, not after '--'" ;;
      --config=*) die "pass --config to $SCRIPT_NAME itself, not after '--'" ;;
    esac
  done
}

# A config given as a relative path must exist in this checkout (the same files run remotely).
check_config_file() {
  [[ -n $CONFIG ]] || return 0
  local path=${CONFIG%%:*}
  [[ $path == /* ]] && return 0
  [[ -f $REPO_ROOT/$path ]] || die "config file '$path' (from --config $CONFIG) not found under $REPO_ROOT"
}

# job_argv PYTHON: the job's command line, in JOB_ARGV.
job_argv() {
  JOB_ARGV=("$1" -m "stablerep_jax.$JOB")
  [[ -n $CONFIG ]] && JOB_ARGV+=("--config=$CONFIG")
  [[ -n $WORKDIR ]] && JOB_ARGV+=("--workdir=$WORKDIR")
  JOB_ARGV+=("${PASSTHROUGH[@]}")
}

# quote_one ARG: the argument as bash reads it back. printf %q decides whether quoting is
# needed; when it is, 'ARG' (or "ARG" with \ " $ ` escaped, if ARG holds a single quote) is
# equally safe and far easier to read, e.g. for remote command strings. Control characters
# and a ! next to a single quote keep printf's form.
quote_one() {
  local q s
  q=$(printf '%q' "$1")
  if [[ $q == "$1" || $q == "\$'"* ]]; then
    printf '%s' "$q"
  elif [[ $1 != *"'"* ]]; then
    printf "'%s'" "$1"
  elif [[ $1 == *'!'* ]]; then
    printf '%s' "$q"   # "...!..." would be history-expanded when pasted into a terminal
  else
    s=${1//\\/\\\\}
    s=${s//\"/\\\"}
    s=${s//\$/\\\$}
    s=${s//\`/\\\`}
    printf '"%s"' "$s"
  fi
}

# quote_args ARG...: one line that a POSIX shell splits back into exactly these arguments.
quote_args() {
  local out="" arg
  for arg in "$@"; do
    out+="$(quote_one "$arg") "
  done
  printf '%s' "${out% }"
}

print_line() {
  printf '+ %s\n' "$*"
}

# run ARG...: print the command, then (unless --dry-run) execute it.
run() {
  print_line "$(quote_args "$@")"
  ((DRY_RUN)) || "$@"
}

# run_to FILE ARG...: like run, with stdout written to FILE.
run_to() {
  local file=$1
  shift
  print_line "$(quote_args "$@") > $(quote_one "$file")"
  ((DRY_RUN)) || "$@" >"$file"
}

# run_export NAME VALUE: export a variable for the job, printed like a command.
run_export() {
  print_line "export $1=$(quote_one "$2")"
  export "$1=$2"
}

# write_file PATH CONTENT: shows the file as a here-document; writes it atomically (tmp + mv).
write_file() {
  local path=$1 content=$2
  print_line "cat > $(quote_one "$path") <<'EOF'"
  printf '%s\n' "$content" EOF
  ((DRY_RUN)) && return 0
  mkdir -p "$(dirname "$path")"
  printf '%s\n' "$content" >"$path.tmp.$$"
  mv "$path.tmp.$$" "$path"
}

# The default per-host log file of a job.
default_log_file() {
  printf 'logs/%s-%s.log' "$JOB" "${HOSTNAME:-$(hostname)}"
}

# local_install EXTRA VENV PYTHON: a venv (unless PYTHON is given) with the package and EXTRA;
# the interpreter that runs the job goes to INSTALL_PYTHON.
local_install() {
  local extra=$1 venv=$2 python=$3
  if [[ -n $python ]]; then
    INSTALL_PYTHON=$python
  else
    run python3 -m venv "$venv"
    INSTALL_PYTHON=$venv/bin/python
  fi
  run "$INSTALL_PYTHON" -m pip install --upgrade pip
  run "$INSTALL_PYTHON" -m pip install -e ".[$extra]"
}

# existing_python VENV PYTHON: the interpreter for a run without install (in INSTALL_PYTHON);
# it has to exist already.
existing_python() {
  local venv=$1 python=$2
  if [[ -n $python ]]; then
    INSTALL_PYTHON=$python
    return
  fi
  if ((!DRY_RUN)) && [[ ! -x $venv/bin/python ]]; then
    die "no virtualenv at $venv (drop --no-install to create it, or pass --python PATH)"
  fi
  INSTALL_PYTHON=$venv/bin/python
}

# The checks after parse_options in the scripts that run the job on this machine; fills in
# the default LOG_FILE.
check_local_options() {
  check_job_options
  check_config_file
  [[ -n $LOG_FILE ]] || LOG_FILE=$(default_log_file)
}

# prepare_local_run EXTRA: from the checkout, the install with EXTRA (or, with --no-install, the
# existing interpreter), INSTALL_PYTHON set either way.
prepare_local_run() {
  ((DRY_RUN)) && echo "# $SCRIPT_NAME --dry-run: nothing below is executed"
  print_line "cd $(quote_args "$REPO_ROOT")"
  cd "$REPO_ROOT" || exit
  if ((INSTALL)); then
    local_install "$1" "$VENV" "$PYTHON_EXE"
  else
    existing_python "$VENV" "$PYTHON_EXE"
  fi
}

# A previous background run of this job that is still alive, if any (pid on stdout).
running_pid() {
  local pid_file=$1 pid
  [[ -f $pid_file ]] || return 1
  pid=$(<"$pid_file")
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  kill -0 "$pid" 2>/dev/null || return 1
  printf '%s' "$pid"
}

# run_job_locally LOG_FILE FOREGROUND ARG...: the job with its output in LOG_FILE (appended).
# Foreground: also on the terminal, and the job's exit status is the script's. Background:
# nohup, returns at once, pid next to the log (LOG_FILE with .pid for .log).
run_job_locally() {
  local log_file=$1 foreground=$2 pid_file pid
  shift 2
  pid_file=${log_file%.log}.pid
  if pid=$(running_pid "$pid_file"); then
    die "a previous $JOB run is still running (pid $pid, $pid_file); stop it first: kill $pid"
  fi
  run mkdir -p "$(dirname "$log_file")"
  if ((foreground)); then
    print_line "$(quote_args "$@") 2>&1 | tee -a $(quote_one "$log_file")"
    ((DRY_RUN)) && return 0
    "$@" 2>&1 | tee -a "$log_file"
  else
    print_line "nohup $(quote_args "$@") >> $(quote_one "$log_file") 2>&1 &"
    ((DRY_RUN)) && return 0
    nohup "$@" >>"$log_file" 2>&1 &
    pid=$!
    echo "$pid" >"$pid_file"
    log "started $JOB in the background: pid $pid, log $log_file (follow it with: tail -f $log_file)"
  fi
}

# Starts the job with INSTALL_PYTHON, per --foreground and --log-file (after prepare_local_run).
start_local_job() {
  job_argv "$INSTALL_PYTHON"
  run_job_locally "$LOG_FILE" "$FOREGROUND" "${JOB_ARGV[@]}"
}

# gpu_xla_flags CURRENT: XLA_FLAGS with our GPU flag added unless the user already set it.
gpu_xla_flags() {
  local current=$1
  if [[ $current == *--xla_gpu_enable_latency_hiding_scheduler* ]]; then
    printf '%s' "$current"
  else
    printf '%s' "${current:+$current }$GPU_XLA_FLAG"
  fi
}
