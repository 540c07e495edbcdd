"""The launch scripts: the commands they print and run, without a cloud or a cluster.

`--dry-run` output is checked argument by argument (each `+ ` line is split back into argv by
bash itself). The retry loop of tpu_pod.sh and the rendered sbatch script are checked by real
runs against stand-in `gcloud` / `sbatch` / `srun` / `scontrol` executables on PATH that record
what they are asked to do, and the local scripts by running a job for real.
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import socket
import stat
import subprocess
import sys
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
SCRIPTS = ["tpu_vm.sh", "tpu_pod.sh", "gpu_single.sh", "gpu_slurm.sh"]
TRAIN_ARGS = ["--job", "train", "--config", "configs/stablerep.py:tiny", "--workdir", "gs://bkt/runs/t1"]
PASS = ["--config.data.train_files=gs://bkt/data/*.tfrecord", "--config.total_steps=7"]
POD = ["--name", "sr-pod", "--zone", "us-central2-b"]


def launch(script, *args, env=None, timeout=120):
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run(["bash", str(LAUNCH / script), *map(str, args)], capture_output=True,
                          text=True, env=full_env, timeout=timeout)


def ok(result):
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


def argv_of(line: str) -> list[str]:
    """How bash splits a printed command line into arguments."""
    out = subprocess.run(["bash", "-c", 'f() { printf "%s\\0" "$@"; }; eval "f $1"', "_", line],
                         capture_output=True, check=True)
    return out.stdout.decode().split("\0")[:-1]


def commands(stdout: str) -> list[str]:
    return [line[2:] for line in stdout.splitlines() if line.startswith("+ ")]


def gcloud_lines(stdout: str, sub: str) -> list[list[str]]:
    prefix = f"gcloud compute tpus tpu-vm {sub} "
    return [argv_of(c) for c in commands(stdout) if c.startswith(prefix)]


def command_flag(argv: list[str]) -> str:
    values = [a.split("=", 1)[1] for a in argv if a.startswith("--command=")]
    assert len(values) == 1, argv
    return values[0]


def remote_job_argv(remote: str) -> list[str]:
    """The job's argv inside a worker command `... exec ARGV >> logs/... 2>&1`."""
    assert " exec " in remote and " >> " in remote, remote
    return argv_of(remote.split(" exec ", 1)[1].rsplit(" >> ", 1)[0])


def write_exe(path: pathlib.Path, text: str) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


# A stand-in job interpreter: records its argv and the environment the job would see.
FAKE_PYTHON = f"""#!{sys.executable}
import json, os, sys, time
keys = ["CUDA_VISIBLE_DEVICES", "TF_FORCE_GPU_ALLOW_GROWTH", "XLA_PYTHON_CLIENT_MEM_FRACTION",
        "XLA_FLAGS", "SLURM_PROCID", "COORDINATOR_ADDRESS"]
record = {{"argv": sys.argv[1:], "env": {{k: os.environ.get(k) for k in keys}}}}
print("FAKE-JOB " + json.dumps(record), flush=True)
out = os.environ.get("FAKE_RECORD_DIR")
if out:
    with open(os.path.join(out, "proc-%s.json" % os.environ.get("SLURM_PROCID", "x")), "w") as f:
        json.dump(record, f)
time.sleep(float(os.environ.get("FAKE_JOB_SLEEP", "0")))
sys.exit(int(os.environ.get("FAKE_JOB_EXIT", "0")))
"""


def fake_job_records(text: str) -> list[dict]:
    return [json.loads(line.split("FAKE-JOB ", 1)[1]) for line in text.splitlines()
            if line.startswith("FAKE-JOB ")]


# --------------------------------------------------------------------------------------------
# All scripts: syntax, help, strict options


@pytest.mark.parametrize("name", ["common.sh", *SCRIPTS])
def test_bash_syntax(name):
    ok(subprocess.run(["bash", "-n", str(LAUNCH / name)], capture_output=True, text=True))


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_shellcheck_clean():
    result = subprocess.run(["shellcheck", "-x", *(f"launch/{s}" for s in ["common.sh", *SCRIPTS])],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("name", SCRIPTS)
def test_help(name):
    result = ok(launch(name, "--help"))
    assert "Usage:" in result.stdout and "--dry-run" in result.stdout and "Example:" in result.stdout


def _required(name):
    return POD if name == "tpu_pod.sh" else []


@pytest.mark.parametrize("name", SCRIPTS)
def test_unknown_option_fails_clearly(name):
    result = launch(name, *_required(name), *TRAIN_ARGS, "--frobnicate", "--dry-run")
    assert result.returncode == 2
    assert f"{name}: error: unknown option '--frobnicate'" in result.stderr
    assert not commands(result.stdout)


@pytest.mark.parametrize("name", SCRIPTS)
def test_job_flag_before_separator_gets_a_hint(name):
    result = launch(name, *_required(name), *TRAIN_ARGS, "--config.total_steps=7", "--dry-run")
    assert result.returncode == 2
    assert "unknown option '--config.total_steps=7'" in result.stderr and "after '--'" in result.stderr


@pytest.mark.parametrize("name,args,message", [
    ("tpu_vm.sh", ["--config", "configs/stablerep.py"], "missing required option --job"),
    ("gpu_single.sh", ["--job", "train", "--config", "configs/stablerep.py"],
     "missing required option --workdir for --job train"),
    ("gpu_slurm.sh", ["--job", "train", "--workdir", "w"], "missing required option --config"),
    ("tpu_pod.sh", ["--zone", "z", *TRAIN_ARGS], "missing required option --name"),
    ("tpu_pod.sh", ["--name", "sr-pod", *TRAIN_ARGS], "missing required option --zone"),
    ("tpu_pod.sh", [*POD, "--create", *TRAIN_ARGS], "--create needs --accelerator-type"),
    ("tpu_vm.sh", ["--job", "fly", "--config", "c.py"], "--job must be one of"),
    ("tpu_vm.sh", ["--job", "train", "--config", "configs/nope.py", "--workdir", "w"],
     "config file 'configs/nope.py'"),
    ("tpu_vm.sh", ["--job", "generate", "--config", "configs/stablerep.py", "--workdir", "w"],
     "takes no --workdir"),
    ("gpu_slurm.sh", [*TRAIN_ARGS, "--nodes"], "option --nodes needs a value"),
    ("gpu_slurm.sh", [*TRAIN_ARGS, "--nodes", "two"], "--nodes needs a non-negative integer"),
    ("tpu_pod.sh", [*POD, *TRAIN_ARGS, "--retries", "-1"], "--retries needs a non-negative integer"),
    # Values that go on #SBATCH lines: a newline injects a line, a space cuts the option.
    ("gpu_slurm.sh", [*TRAIN_ARGS, "--partition", "gpu\n#SBATCH --uid=0"],
     "--partition $'gpu\\n#SBATCH --uid=0' may only hold"),
    ("gpu_slurm.sh", [*TRAIN_ARGS, "--account", "lab\nrm -rf ~"], "--account $'lab\\nrm -rf ~' may only"),
    ("gpu_slurm.sh", [*TRAIN_ARGS, "--partition", "gpu a100"], "--partition 'gpu a100' may only hold"),
    ("gpu_slurm.sh", [*TRAIN_ARGS, "--log-dir", "/shared/my logs"],
     "--log-dir '/shared/my logs' holds whitespace"),
])
def test_bad_arguments_fail_clearly(name, args, message):
    result = launch(name, *args, "--dry-run")
    assert result.returncode == 2, result.stdout
    assert message in result.stderr
    assert not commands(result.stdout)


# --------------------------------------------------------------------------------------------
# tpu_vm.sh and gpu_single.sh: one machine


def test_tpu_vm_dry_run(tmp_path):
    venv = tmp_path / "venv"
    result = ok(launch("tpu_vm.sh", *TRAIN_ARGS, "--venv", venv, "--dry-run", "--", *PASS))
    cmds = commands(result.stdout)
    assert argv_of(cmds[1]) == ["python3", "-m", "venv", str(venv)]
    assert argv_of(cmds[-3]) == [f"{venv}/bin/python", "-m", "pip", "install", "-e", ".[tpu]"]
    assert argv_of(cmds[-2]) == ["mkdir", "-p", "logs"]
    job_line = cmds[-1]
    assert job_line.startswith("nohup ")
    job, redirect = job_line[len("nohup "):].split(" >> ")
    assert argv_of(job) == [f"{venv}/bin/python", "-m", "stablerep_jax.train",
                            "--config=configs/stablerep.py:tiny", "--workdir=gs://bkt/runs/t1", *PASS]
    assert redirect == f"logs/train-{socket.gethostname()}.log 2>&1 &"
    assert not venv.exists()        # nothing ran


def test_gpu_single_dry_run_environment(tmp_path):
    result = ok(launch("gpu_single.sh", *TRAIN_ARGS, "--gpus", "2,3", "--foreground", "--venv",
                       tmp_path / "venv", "--dry-run", "--", *PASS, env={"XLA_FLAGS": "--xla_dump_to=/tmp/d"}))
    cmds = commands(result.stdout)
    assert [f"{tmp_path}/venv/bin/python", "-m", "pip", "install", "-e", ".[cuda12]"] in map(argv_of, cmds)
    exports = {c.split("=", 1)[0][len("export "):]: argv_of(c.split("=", 1)[1])[0]
               for c in cmds if c.startswith("export ")}
    assert exports == {
        "CUDA_VISIBLE_DEVICES": "2,3",
        "TF_FORCE_GPU_ALLOW_GROWTH": "true",
        "XLA_PYTHON_CLIENT_MEM_FRACTION": ".90",
        "XLA_FLAGS": "--xla_dump_to=/tmp/d --xla_gpu_enable_latency_hiding_scheduler=true",
    }
    job, tee = cmds[-1].split(" 2>&1 | ")
    assert argv_of(job)[1:] == ["-m", "stablerep_jax.train", "--config=configs/stablerep.py:tiny",
                                "--workdir=gs://bkt/runs/t1", *PASS]
    assert tee == f"tee -a logs/train-{socket.gethostname()}.log"


@pytest.mark.parametrize("name", ["tpu_vm.sh", "gpu_single.sh"])
def test_local_job_runs_in_foreground(tmp_path, name):
    python = write_exe(tmp_path / "bin" / "python", FAKE_PYTHON)
    log = tmp_path / "logs" / "run.log"
    extra = ["--gpus", "1"] if name == "gpu_single.sh" else []
    result = launch(name, *TRAIN_ARGS, *extra, "--python", python, "--no-install", "--foreground",
                    "--log-file", log, "--", *PASS, env={"FAKE_JOB_EXIT": "3"})
    assert result.returncode == 3, result.stderr        # the job's exit status comes through
    records = fake_job_records(log.read_text())
    assert records == fake_job_records(result.stdout)   # on the terminal and in the log
    (record,) = records
    assert record["argv"] == ["-m", "stablerep_jax.train", "--config=configs/stablerep.py:tiny",
                              "--workdir=gs://bkt/runs/t1", *PASS]
    if name == "gpu_single.sh":
        assert record["env"]["CUDA_VISIBLE_DEVICES"] == "1"
        assert record["env"]["TF_FORCE_GPU_ALLOW_GROWTH"] == "true"
        assert record["env"]["XLA_PYTHON_CLIENT_MEM_FRACTION"] == ".90"
        assert record["env"]["XLA_FLAGS"].endswith("--xla_gpu_enable_latency_hiding_scheduler=true")


def _wait_for_exit(pid: int, limit_s: float = 60.0) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    raise AssertionError(f"pid {pid} still running after {limit_s}s")


def _wait_for_records(log: pathlib.Path, limit_s: float = 60.0) -> list[dict]:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        records = fake_job_records(log.read_text()) if log.exists() else []
        if records:
            return records
        time.sleep(0.1)
    raise AssertionError(f"{log} got no job output within {limit_s}s")


def test_background_job_and_a_second_launch_refused(tmp_path):
    python = write_exe(tmp_path / "bin" / "python", FAKE_PYTHON)
    log = tmp_path / "logs" / "train-host.log"
    args = [*TRAIN_ARGS, "--python", python, "--no-install", "--log-file", log, "--", *PASS]
    first = ok(launch("tpu_vm.sh", *args, env={"FAKE_JOB_SLEEP": "60"}))
    pid = int((tmp_path / "logs" / "train-host.pid").read_text())
    try:
        assert f"pid {pid}" in first.stderr
        second = launch("tpu_vm.sh", *args)
        assert second.returncode == 2
        assert f"still running (pid {pid}" in second.stderr
        records = _wait_for_records(log)    # the script returned while the job runs on
    finally:
        os.kill(pid, 15)
        _wait_for_exit(pid)
    (record,) = records
    assert record["argv"] == ["-m", "stablerep_jax.train", "--config=configs/stablerep.py:tiny",
                              "--workdir=gs://bkt/runs/t1", *PASS]


def test_the_real_job_receives_the_flags(tmp_path):
    """The real CLI behind the script rejects an unknown override key, naming it."""
    log = tmp_path / "convert.log"
    result = launch("gpu_single.sh", "--job", "convert", "--config", "configs/convert.py",
                    "--python", sys.executable, "--no-install", "--foreground", "--log-file", log,
                    "--", "--config.no_such_key=1")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "unknown config key 'no_such_key'" in log.read_text()


# --------------------------------------------------------------------------------------------
# tpu_pod.sh: a pod slice from a workstation

FAKE_GCLOUD = f"""#!{sys.executable}
# Plays gcloud for one TPU slice; the first FAKE_PREEMPT_RUNS job runs end in a preemption.
import json, os, pathlib, sys
d = pathlib.Path(os.environ["FAKE_GCLOUD_DIR"])
args = sys.argv[1:]
with open(d / "calls.jsonl", "a") as f:
    f.write(json.dumps(args) + "\\n")
state = d / "state"
sub = args[3] if args[:3] == ["compute", "tpus", "tpu-vm"] else None
if sub == "describe":
    if not state.exists():
        sys.exit("ERROR: (gcloud.compute.tpus.tpu-vm.describe) NOT_FOUND: sr-pod")
    print(state.read_text())
elif sub == "create":
    state.write_text("READY")
elif sub == "delete":
    state.unlink()
elif sub == "ssh" and any("stablerep_jax." in a for a in args):
    runs = d / "runs"
    n = int(runs.read_text()) + 1 if runs.exists() else 1
    runs.write_text(str(n))
    if n <= int(os.environ.get("FAKE_PREEMPT_RUNS", "0")):
        state.write_text("PREEMPTED")
        sys.exit(int(os.environ.get("FAKE_PREEMPT_EXIT", "255")))
    if n <= int(os.environ.get("FAKE_RESUME_RUNS", "0")):
        sys.exit(75)                 # the job stopped early to be resumed; the slice is fine
"""


@pytest.fixture
def fake_gcloud(tmp_path):
    bin_dir = tmp_path / "fakebin"
    write_exe(bin_dir / "gcloud", FAKE_GCLOUD)
    state_dir = tmp_path / "gcloud"
    state_dir.mkdir()

    def calls():
        path = state_dir / "calls.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_GCLOUD_DIR": str(state_dir)}
    return env, state_dir, calls


def test_tpu_pod_dry_run(fake_gcloud):
    env, _, calls = fake_gcloud
    result = ok(launch("tpu_pod.sh", *POD, "--create", "--accelerator-type", "v4-32", "--spot",
                       "--retries", "3", *TRAIN_ARGS, "--dry-run", "--", *PASS, env=env))
    assert calls() == []            # printed, not run
    zone = "--zone=us-central2-b"
    (create, *_) = gcloud_lines(result.stdout, "create")
    assert create == ["gcloud", "compute", "tpus", "tpu-vm", "create", "sr-pod", "--accelerator-type=v4-32",
                      "--version=tpu-ubuntu2204-base", "--spot", zone]
    (scp, *_) = gcloud_lines(result.stdout, "scp")
    assert "--worker=all" in scp and zone in scp and scp[-3].endswith(".tar.gz")
    ssh = gcloud_lines(result.stdout, "ssh")
    assert all("--worker=all" in argv and zone in argv for argv in ssh)
    remotes = [command_flag(argv) for argv in ssh]
    assert any("pip install -q -e '.[tpu]'" in r for r in remotes)
    runs = [r for r in remotes if "stablerep_jax." in r]
    assert len(runs) == 2 and runs[0] == runs[1]   # the retry reruns the very same command
    assert remote_job_argv(runs[0]) == [".venv/bin/python", "-m", "stablerep_jax.train",
                                        "--config=configs/stablerep.py:tiny",
                                        "--workdir=gs://bkt/runs/t1", *PASS]
    assert runs[0].endswith(" >> logs/train-$(hostname).log 2>&1")   # one log per host
    assert "# attempt 1 of 4" in result.stdout and "up to 3 more attempts" in result.stdout
    retry_block = result.stdout.split("up to 3 more attempts")[1]
    assert [argv_of(c)[4] for c in commands(retry_block) if c.startswith("gcloud")] == [
        "describe", "delete", "create", "scp", "ssh", "ssh", "ssh"]


def test_tpu_pod_dry_run_clones_a_branch(fake_gcloud):
    env, _, calls = fake_gcloud
    result = ok(launch("tpu_pod.sh", *POD, "--project", "proj-1", "--repo-url", "https://example.org/sr.git",
                       "--branch", "v1", "--job", "generate", "--config", "configs/stablerep.py",
                       "--dry-run", "--", "--config.output_dir=gs://bkt/gen", env=env))
    assert calls() == []
    ssh = gcloud_lines(result.stdout, "ssh")
    assert all("--project=proj-1" in argv for argv in ssh)
    assert "git clone --depth 1 --branch v1 https://example.org/sr.git stablerep-jax" in command_flag(ssh[0])
    assert gcloud_lines(result.stdout, "scp") == [] and gcloud_lines(result.stdout, "create") == []
    assert remote_job_argv(command_flag(ssh[-1]))[2:] == [
        "stablerep_jax.generate", "--config=configs/stablerep.py", "--config.output_dir=gs://bkt/gen"]


@pytest.mark.parametrize("preempt_exit", [255, 0])
def test_tpu_pod_recreates_a_preempted_slice_and_reruns(fake_gcloud, preempt_exit):
    """A preempted attempt (ssh dropped, or a graceful exit 0 on a slice that is gone)."""
    env, _, calls = fake_gcloud
    env = {**env, "FAKE_PREEMPT_RUNS": "1", "FAKE_PREEMPT_EXIT": str(preempt_exit)}
    result = ok(launch("tpu_pod.sh", *POD, "--create", "--accelerator-type", "v4-32", "--spot",
                       "--retries", "2", "--retry-wait", "0", "--repo-url", "https://example.org/sr.git",
                       *TRAIN_ARGS, "--", *PASS, env=env))
    seq = [c[3] for c in calls()]
    assert seq == ["describe", "create", "ssh", "ssh", "ssh",      # new slice: clone, install, run
                   "describe", "delete", "create", "ssh", "ssh", "ssh",   # preempted: again
                   "describe"]                                    # READY after the second run
    runs = [c for c in calls() if c[3] == "ssh" and "stablerep_jax." in command_flag(c)]
    assert len(runs) == 2 and runs[0] == runs[1]
    assert all("--zone=us-central2-b" in c for c in calls())
    assert all("--worker=all" in c for c in calls() if c[3] in ("ssh", "scp"))
    assert "attempt 1 failed" in result.stderr


def test_tpu_pod_gives_up_after_the_retries(fake_gcloud):
    env, _, calls = fake_gcloud
    env = {**env, "FAKE_PREEMPT_RUNS": "99"}
    result = launch("tpu_pod.sh", *POD, "--create", "--accelerator-type", "v4-8", "--retries", "1",
                    "--retry-wait", "0", "--repo-url", "https://example.org/sr.git", "--no-install",
                    *TRAIN_ARGS, env=env)
    assert result.returncode == 255
    assert "failed on sr-pod (exit 255) after 2 attempt(s)" in result.stderr
    assert sum(c[3] == "create" for c in calls()) == 2


def test_tpu_pod_without_create_needs_a_ready_slice(fake_gcloud):
    env, _, calls = fake_gcloud
    result = launch("tpu_pod.sh", *POD, *TRAIN_ARGS, env=env)
    assert result.returncode == 2
    assert "is absent; pass --create --accelerator-type" in result.stderr
    assert [c[3] for c in calls()] == ["describe"]


@pytest.mark.skipif(shutil.which("git") is None or not (REPO / ".git").exists(),
                    reason="copying the checkout needs git and a git checkout")
def test_tpu_pod_copies_this_checkout(fake_gcloud, tmp_path):
    """scp mode ships the files git would commit, as one tarball, to every worker."""
    env, state_dir, calls = fake_gcloud
    (state_dir / "state").write_text("READY")
    # Keep the tarball: a stand-in for scp that copies it out before the script cleans up.
    keep = tmp_path / "shipped.tar.gz"
    wrapper = write_exe(tmp_path / "fakebin2" / "gcloud", f"""#!/usr/bin/env bash
[[ $4 == scp ]] && cp "$5" {keep}
exec {tmp_path}/fakebin/gcloud "$@"
""")
    env = {**env, "PATH": f"{wrapper.parent}:{env['PATH']}"}
    ok(launch("tpu_pod.sh", *POD, "--no-install", *TRAIN_ARGS, env=env))
    (scp,) = [c for c in calls() if c[3] == "scp"]
    assert scp[5] == "sr-pod:stablerep-jax-src.tar.gz" and "--worker=all" in scp
    names = subprocess.run(["tar", "-tzf", str(keep)], capture_output=True, text=True, check=True).stdout.split()
    assert {"setup.py", "launch/tpu_pod.sh", "stablerep_jax/data/records.py", "configs/stablerep.py"} <= set(names)
    assert not any(n.startswith((".git/", ".venv/", "logs/")) or "__pycache__" in n for n in names)


# --------------------------------------------------------------------------------------------
# gpu_slurm.sh: multi-node GPUs


def _sbatch_script(stdout: str) -> str:
    start = stdout.index("<<'EOF'\n") + len("<<'EOF'\n")
    return stdout[start:stdout.index("\nEOF\n", start)]


def test_gpu_slurm_dry_run(tmp_path):
    result = ok(launch("gpu_slurm.sh", "--nodes", "4", "--gpus-per-node", "8", "--partition", "gpu",
                       "--account", "lab", "--time", "48:00:00", "--sbatch-arg=--exclusive",
                       "--log-dir", tmp_path / "logs", *TRAIN_ARGS, "--dry-run", "--", *PASS))
    script = _sbatch_script(result.stdout)
    for line in ["#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --partition=gpu", "#SBATCH --account=lab", "#SBATCH --time=48:00:00",
                 "#SBATCH --exclusive", "export TF_FORCE_GPU_ALLOW_GROWTH=true",
                 "export XLA_PYTHON_CLIENT_MEM_FRACTION=.90"]:
        assert line in script.splitlines()
    assert 'scontrol show hostnames "$SLURM_JOB_NODELIST"' in script
    (srun,) = [argv_of(line) for line in script.splitlines() if line.startswith("srun ")]
    task = srun.index("stablerep-task")
    assert srun[task - 1] == ('exec "$@" --coordinator_address="$COORDINATOR_ADDRESS" '
                              '--num_processes="$SLURM_NTASKS" --process_id="$SLURM_PROCID"')
    assert srun[task + 1:] == [f"{REPO}/.venv/bin/python", "-m", "stablerep_jax.train",
                               "--config=configs/stablerep.py:tiny", "--workdir=gs://bkt/runs/t1", *PASS]
    assert f"--output={tmp_path}/logs/train-%j-%N.log" in srun
    sbatch = argv_of(commands(result.stdout)[-1])
    assert sbatch[0] == "sbatch" and sbatch[1].startswith(f"{tmp_path}/logs/stablerep-train-")
    assert not (tmp_path / "logs").exists()      # nothing written


def test_gpu_slurm_other_jobs_get_no_coordinator_flags():
    result = ok(launch("gpu_slurm.sh", "--job", "generate", "--config", "configs/stablerep.py",
                       "--dry-run", "--", "--config.output_dir=/shared/gen"))
    script = _sbatch_script(result.stdout)
    assert "coordinator_address" not in script
    (srun,) = [argv_of(line) for line in script.splitlines() if line.startswith("srun ")]
    assert srun[-4:] == ["-m", "stablerep_jax.generate", "--config=configs/stablerep.py",
                         "--config.output_dir=/shared/gen"]


FAKE_SRUN = """#!/usr/bin/env bash
# Plays srun inside an allocation: one task per node, each with its own SLURM_PROCID.
while [[ $1 == -* ]]; do shift; done
for ((i = 0; i < SLURM_NTASKS; i++)); do SLURM_PROCID=$i "$@" || exit $?; done
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
if [[ $1 == requeue ]]; then echo "$*" >> "$FAKE_RECORD_DIR/scontrol.txt"; exit 0; fi
[[ "$1 $2 $3" == "show hostnames gpu[007-008]" ]] || exit 1
printf 'gpu007\\ngpu008\\n'
"""


def test_gpu_slurm_submits_a_script_that_starts_every_process(tmp_path):
    bin_dir = tmp_path / "fakebin"
    submitted = tmp_path / "submitted.sbatch"
    write_exe(bin_dir / "sbatch", f'#!/usr/bin/env bash\ncp "$1" {submitted}\necho "Submitted batch job 42"\n')
    write_exe(bin_dir / "srun", FAKE_SRUN)
    write_exe(bin_dir / "scontrol", FAKE_SCONTROL)
    venv = tmp_path / "venv"
    write_exe(venv / "bin" / "python", FAKE_PYTHON)
    path = f"{bin_dir}:{os.environ['PATH']}"
    result = ok(launch("gpu_slurm.sh", "--nodes", "2", "--port", "23456", "--venv", venv, "--no-install",
                       "--log-dir", tmp_path / "logs", *TRAIN_ARGS, "--", *PASS, env={"PATH": path}))
    assert "Submitted batch job 42" in result.stdout
    (kept,) = (tmp_path / "logs").glob("stablerep-train-*.sbatch")   # the script stays for reruns
    assert kept.read_text() == submitted.read_text()

    records = tmp_path / "records"
    records.mkdir()
    env = {"PATH": path, "SLURM_JOB_NODELIST": "gpu[007-008]", "SLURM_NTASKS": "2",
           "FAKE_RECORD_DIR": str(records), "XLA_FLAGS": ""}
    ok(subprocess.run(["bash", str(submitted)], capture_output=True, text=True, env={**os.environ, **env}))
    for proc in (0, 1):
        record = json.loads((records / f"proc-{proc}.json").read_text())
        assert record["argv"] == ["-m", "stablerep_jax.train", "--config=configs/stablerep.py:tiny",
                                  "--workdir=gs://bkt/runs/t1", *PASS, "--coordinator_address=gpu007:23456",
                                  "--num_processes=2", f"--process_id={proc}"]
        assert record["env"]["TF_FORCE_GPU_ALLOW_GROWTH"] == "true"
        assert record["env"]["XLA_FLAGS"] == "--xla_gpu_enable_latency_hiding_scheduler=true"


@pytest.mark.parametrize("job_exit, requeued", [(75, True), (1, False), (0, False)])
def test_gpu_slurm_requeues_a_train_job_that_stopped_to_be_resumed(tmp_path, job_exit, requeued):
    """Exit 75 (SIGTERM: preemption, or the --signal notice before the time limit) requeues
    the job; its exit code is the batch script's either way."""
    bin_dir = tmp_path / "fakebin"
    write_exe(bin_dir / "srun", FAKE_SRUN)
    write_exe(bin_dir / "scontrol", FAKE_SCONTROL)
    venv = tmp_path / "venv"
    write_exe(venv / "bin" / "python", FAKE_PYTHON)
    result = ok(launch("gpu_slurm.sh", "--venv", venv, "--no-install", "--log-dir", tmp_path / "logs",
                       *TRAIN_ARGS, "--dry-run", "--", *PASS))
    script = _sbatch_script(result.stdout)
    assert "#SBATCH --requeue" in script.splitlines()
    assert "#SBATCH --signal=TERM@300" in script.splitlines()
    (tmp_path / "job.sbatch").write_text(script)
    records = tmp_path / "records"
    records.mkdir()
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "gpu[007-008]",
           "SLURM_NTASKS": "1", "SLURM_JOB_ID": "42", "FAKE_RECORD_DIR": str(records),
           "FAKE_JOB_EXIT": str(job_exit)}
    run = subprocess.run(["bash", str(tmp_path / "job.sbatch")], capture_output=True, text=True,
                         env={**os.environ, **env})
    assert run.returncode == job_exit, run.stderr
    scontrol = records / "scontrol.txt"
    assert (scontrol.read_text() == "requeue 42\n") if requeued else not scontrol.exists()


def test_tpu_pod_reruns_a_job_that_stopped_to_be_resumed(fake_gcloud):
    """Exit 75 on a slice that stays READY (e.g. a maintenance SIGTERM): the same command again."""
    env, state_dir, calls = fake_gcloud
    (state_dir / "state").write_text("READY")
    env = {**env, "FAKE_RESUME_RUNS": "1"}
    result = ok(launch("tpu_pod.sh", *POD, "--retries", "1", "--retry-wait", "0",
                       "--repo-url", "https://example.org/sr.git", "--no-install", *TRAIN_ARGS,
                       env=env))
    runs = [c for c in calls() if c[3] == "ssh" and "stablerep_jax." in command_flag(c)]
    assert len(runs) == 2 and runs[0] == runs[1]
    assert "train stopped early to be resumed (exit 75" in result.stderr
