"""The launch files, without a cloud or a cluster.

SkyPilot task files (launch/*.yaml) are loaded with SkyPilot's own parser; their `run:` is
executed under bash with a stand-in `python3` on PATH that records its argv and exits with a
chosen code, and SkyPilot's managed-job recovery is played by rerunning it while the exit code is
in the task's `job_recovery.recover_on_exit_codes`. The SLURM sbatch script is rendered and run
with stand-in `sbatch` / `srun` / `scontrol`.
"""
from __future__ import annotations

import ast
import importlib
import importlib.util
import json
import os
import pathlib
import shutil
import signal
import stat
import subprocess
import sys
import time

import pytest
import yaml

from stablerep_jax import jobs
from stablerep_jax.cli import EXIT_RESUME

REPO = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
SCRIPTS = ["run_job.sh", "gpu_slurm.sh"]
TASKS = ["generate_tpu.yaml", "train_tpu.yaml", "train_gpu.yaml"]
IN_CI = os.environ.get("CI", "").lower() == "true"


def need(module: str):
    """The module; in CI (CI=true) a missing test dependency fails instead of skipping."""
    if IN_CI:
        return importlib.import_module(module)
    return pytest.importorskip(module)


def write_exe(path: pathlib.Path, text: str) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def argv_of(line: str) -> list[str]:
    """How bash splits a printed command line into arguments."""
    out = subprocess.run(["bash", "-c", 'f() { printf "%s\\0" "$@"; }; eval "f $1"', "_", line],
                         capture_output=True, check=True)
    return out.stdout.decode().split("\0")[:-1]


# A stand-in job interpreter. `python3 -m stablerep_jax.jobs` is the real one (the launch files
# ask the package for its jobs); anything else appends {"argv", "env"} to FAKE_RECORD_DIR/runs.jsonl
# and exits with the next code of FAKE_JOB_EXITS (comma-separated; the last one repeats).
FAKE_PYTHON = f"""#!{sys.executable}
import json, os, sys
if sys.argv[1:3] == ["-m", "stablerep_jax.jobs"]:
    os.environ["PYTHONPATH"] = {str(REPO)!r}
    os.execv({sys.executable!r}, [{sys.executable!r}] + sys.argv[1:])
keys = ["TF_FORCE_GPU_ALLOW_GROWTH", "XLA_PYTHON_CLIENT_MEM_FRACTION", "XLA_FLAGS", "SLURM_PROCID"]
record = {{"argv": sys.argv[1:], "env": {{k: os.environ.get(k) for k in keys}}}}
out = os.environ["FAKE_RECORD_DIR"]
with open(os.path.join(out, "runs.jsonl"), "a") as f:
    f.write(json.dumps(record) + "\\n")
codes = os.environ.get("FAKE_JOB_EXITS", "0").split(",")
done = sum(1 for _ in open(os.path.join(out, "runs.jsonl")))
sys.exit(int(codes[min(done, len(codes)) - 1]))
"""


def fake_runs(record_dir: pathlib.Path) -> list[dict]:
    path = record_dir / "runs.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture
def fake_python3(tmp_path):
    """(env, record_dir): PATH with the stand-in python3 first."""
    bin_dir = tmp_path / "fakebin"
    write_exe(bin_dir / "python3", FAKE_PYTHON)
    records = tmp_path / "records"
    records.mkdir()
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_RECORD_DIR": str(records)}
    for key in ("SKYPILOT_NODE_IPS", "SKYPILOT_NODE_RANK", "JAX_CLUSTER"):
        env.pop(key, None)
    return env, records


# --------------------------------------------------------------------------------------------
# Scripts and the job list


@pytest.mark.parametrize("name", SCRIPTS)
def test_bash_syntax(name):
    result = subprocess.run(["bash", "-n", str(LAUNCH / name)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_shellcheck_clean():
    if shutil.which("shellcheck") is None:
        if IN_CI:
            pytest.fail("shellcheck is not installed (.ci/run installs it)")
        pytest.skip("shellcheck is not installed")
    result = subprocess.run(["shellcheck", "-x", ".ci/run", *(f"launch/{s}" for s in SCRIPTS)],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def _entry_source(job: str) -> str:
    """The source `python -m stablerep_jax.<job>` runs: the module, or a package's __main__."""
    module = REPO / "stablerep_jax" / f"{job}.py"
    return (module if module.exists() else REPO / "stablerep_jax" / job / "__main__.py").read_text()


def _job_modules() -> set[str]:
    """Modules of the package (and subpackages' `__main__`) whose `__main__` block calls
    `cli.run`: the jobs, found anew."""
    found = set()
    package = REPO / "stablerep_jax"
    for path in [*package.glob("*.py"), *package.glob("*/__main__.py")]:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "run" and getattr(node.func.value, "id", None) == "cli"):
                found.add(path.parent.name if path.name == "__main__.py" else path.stem)
    return found


def test_job_list_is_the_package_s():
    assert set(jobs.JOBS) == _job_modules()
    for job in jobs.JOBS:
        assert importlib.util.find_spec(f"stablerep_jax.{job}") is not None, job


def test_jobs_that_take_the_coordinator_flags():
    """Every job that calls cli.define_job_flags takes them, knn and linear_probe included."""
    flagged = {j for j in jobs.JOBS if "define_job_flags(" in _entry_source(j)}
    assert {"generate", "import_images", "train", "linear_probe", "knn"} <= flagged
    assert {j for j in jobs.JOBS if jobs.takes_cluster_flags(j)} == flagged


def test_jobs_command_line():
    run = lambda *a: subprocess.run([sys.executable, "-m", "stablerep_jax.jobs", *a],  # noqa: E731
                                    capture_output=True, text=True, cwd="/", env={**os.environ, "PYTHONPATH": str(REPO)})
    assert run().stdout.split() == list(jobs.JOBS)
    assert run("knn").stdout.strip() == "cluster-flags"
    assert run("generate").stdout.strip() == "cluster-flags"
    assert run("convert").stdout.strip() == "auto"
    # generate and import_images write to their config's output_dir: no --workdir
    assert [run("--requires-workdir", j).stdout.strip() for j in ("knn", "generate", "import_images",
                                                                   "demo")] == ["yes", "no", "no", "no"]
    bad = run("fly")
    assert bad.returncode == 2 and "unknown job 'fly'" in bad.stderr and "linear_probe" in bad.stderr


# --------------------------------------------------------------------------------------------
# SkyPilot task files

REQUIRED_ENVS = {"generate_tpu.yaml": {"CAPTIONS", "OUTPUT_DIR"},
                 "train_tpu.yaml": {"WORKDIR", "TRAIN_FILES"},
                 "train_gpu.yaml": {"WORKDIR", "TRAIN_FILES"}}
VALUES = {"CAPTIONS": "gs://bkt/captions.txt", "OUTPUT_DIR": "gs://bkt/syn",
          "WORKDIR": "gs://bkt/runs/t1", "TRAIN_FILES": "gs://bkt/syn/*.tfrecord"}


def load_task(name: str, **overrides):
    """The task as `sky jobs launch NAME --env K=V ...` builds it (required envs filled in)."""
    sky = need("sky")
    config = yaml.safe_load((LAUNCH / name).read_text())
    envs = {k: VALUES[k] for k, v in config["envs"].items() if v is None}
    envs.update(overrides)
    return sky.Task.from_yaml_config(config, env_overrides=list(envs.items()))


@pytest.mark.parametrize("name", TASKS)
def test_task_file_needs_its_paths(name):
    """SkyPilot's parser refuses the file until the user gives the data and output paths."""
    sky = need("sky")
    for env in REQUIRED_ENVS[name]:
        config = yaml.safe_load((LAUNCH / name).read_text())
        others = [(k, VALUES[k]) for k in REQUIRED_ENVS[name] - {env}]
        with pytest.raises(ValueError, match=f"'{env}' is None"):
            sky.Task.from_yaml_config(config, env_overrides=others)
    with pytest.raises(ValueError, match="is None"):
        sky.Task.from_yaml(str(LAUNCH / name))


@pytest.mark.parametrize("name, accelerators, nodes, extra", [
    ("generate_tpu.yaml", {"tpu-v4-32": 1}, 1, "tpu"),
    ("train_tpu.yaml", {"tpu-v4-32": 1}, 1, "tpu"),
    ("train_gpu.yaml", {"H100": 8}, 2, "cuda12"),
])
def test_task_resources_and_recovery(name, accelerators, nodes, extra):
    task = load_task(name)
    (resources,) = task.resources
    assert resources.accelerators == accelerators and task.num_nodes == nodes
    if name.endswith("_tpu.yaml"):
        assert resources.accelerator_args["runtime_version"] == "tpu-ubuntu2204-base"
    assert resources.use_spot
    assert resources.job_recovery["recover_on_exit_codes"] == [EXIT_RESUME]
    assert task.workdir == "."
    assert task.setup.split() == ["python3", "-m", "pip", "install", "-e", f"'.[{extra}]'"]
    setup_py = (REPO / "setup.py").read_text()
    assert f'"{extra}": [' in setup_py


@pytest.mark.parametrize("name", TASKS)
def test_task_names_jobs_of_the_package(name):
    task = load_task(name)
    words = task.run.split()
    named = [words[i + 1] for i, w in enumerate(words) if w == "launch/run_job.sh"]
    assert named and all(job in jobs.JOBS for job in named)
    for job in named:
        assert importlib.util.find_spec(f"stablerep_jax.{job}") is not None


def run_task(task, env, **extra) -> subprocess.CompletedProcess:
    """The task's `run:` on one host, as SkyPilot runs it: bash, in the synced workdir, with the
    task's envs exported."""
    full = {**env, **task.envs, **extra}
    return subprocess.run(["bash", "-c", task.run], cwd=REPO, env=full, capture_output=True,
                          text=True, timeout=120)


def managed_job(task, env, limit=5, **extra) -> tuple[int, int]:
    """Plays SkyPilot's managed-job controller on a cluster that stays up: rerun the task while
    its exit code is in recover_on_exit_codes. Returns (final exit code, runs)."""
    (resources,) = task.resources
    recover = resources.job_recovery["recover_on_exit_codes"]
    for attempt in range(1, limit + 1):
        result = run_task(task, env, **extra)
        if result.returncode not in recover:
            return result.returncode, attempt
    return result.returncode, limit


@pytest.mark.parametrize("name", TASKS)
def test_run_exits_with_the_job_s_code(name, fake_python3):
    env, records = fake_python3
    task = load_task(name)
    for code in (0, EXIT_RESUME, 1):
        result = run_task(task, env, FAKE_JOB_EXITS=str(code))
        assert result.returncode == code, result.stderr
        # The job says "stopped early to be resumed" itself (cli): run_job.sh execs it.
        (records / "runs.jsonl").unlink()


@pytest.mark.parametrize("name", TASKS)
def test_preempted_job_is_rerun_with_the_same_command(name, fake_python3):
    """75, 75, 0: two restarts, the same argv each time (so train resumes from its workdir)."""
    env, records = fake_python3
    task = load_task(name)
    assert managed_job(task, env, FAKE_JOB_EXITS=f"{EXIT_RESUME},{EXIT_RESUME},0") == (0, 3)
    runs = fake_runs(records)
    assert len(runs) == 3 and runs[0]["argv"] == runs[1]["argv"] == runs[2]["argv"]
    argv = runs[0]["argv"]
    job = "generate" if name.startswith("generate") else "train"
    assert argv[:2] == ["-m", f"stablerep_jax.{job}"]
    if job == "train":
        assert "--workdir=gs://bkt/runs/t1" in argv
        assert "--config.data.train_files=gs://bkt/syn/*.tfrecord" in argv
    else:
        assert "--config.output_dir=gs://bkt/syn" in argv


def test_failed_job_is_not_rerun_forever(fake_python3):
    env, records = fake_python3
    task = load_task("train_tpu.yaml")
    assert managed_job(task, env, FAKE_JOB_EXITS="1") == (1, 1)
    (resources,) = task.resources
    assert resources.job_recovery["max_restarts_on_errors"] <= 3


def test_gpu_nodes_get_the_coordinator_flags(fake_python3):
    env, records = fake_python3
    task = load_task("train_gpu.yaml", EXTRA_FLAGS="--config.batch_size=64 --config.total_steps=9")
    for rank in (0, 1):
        assert run_task(task, env, SKYPILOT_NODE_IPS="10.0.0.5\n10.0.0.6\n",
                        SKYPILOT_NODE_RANK=str(rank)).returncode == 0
    runs = fake_runs(records)
    for rank, run in enumerate(runs):
        assert run["argv"] == ["-m", "stablerep_jax.train", "--config=configs/stablerep.py:vit_b16_cc12m_1x",
                               "--workdir=gs://bkt/runs/t1", "--config.data.train_files=gs://bkt/syn/*.tfrecord",
                               "--config.batch_size=64", "--config.total_steps=9",
                               "--coordinator_address=10.0.0.5:12345", "--num_processes=2",
                               f"--process_id={rank}"]
        assert run["env"]["TF_FORCE_GPU_ALLOW_GROWTH"] == "true"
        assert run["env"]["XLA_PYTHON_CLIENT_MEM_FRACTION"] == ".90"
        assert run["env"]["XLA_FLAGS"] == "--xla_gpu_enable_latency_hiding_scheduler=true"


def test_one_gpu_node_and_tpu_pods_get_no_coordinator_flags(fake_python3):
    env, records = fake_python3
    assert run_task(load_task("train_gpu.yaml"), env, SKYPILOT_NODE_IPS="10.0.0.5",
                    SKYPILOT_NODE_RANK="0").returncode == 0
    # A TPU pod: SkyPilot lists every host of the slice; libtpu and JAX find them themselves.
    assert run_task(load_task("train_tpu.yaml"), env, SKYPILOT_NODE_IPS="10.0.0.5\n10.0.0.6",
                    SKYPILOT_NODE_RANK="1").returncode == 0
    for run in fake_runs(records):
        assert not any(a.startswith(("--coordinator_address", "--num_processes", "--process_id"))
                       for a in run["argv"]), run["argv"]


# A stand-in job that stops like train on SIGTERM: it records each SIGTERM it gets in
# FAKE_RECORD_DIR/signals, waits a moment for more, and exits 75.
SIGTERM_PYTHON = f"""#!{sys.executable}
import os, signal, sys, time
if sys.argv[1:3] == ["-m", "stablerep_jax.jobs"]:
    os.environ["PYTHONPATH"] = {str(REPO)!r}
    os.execv({sys.executable!r}, [{sys.executable!r}] + sys.argv[1:])
out = os.environ["FAKE_RECORD_DIR"]
got = []
def on_term(signum, frame):
    got.append(signum)
    with open(os.path.join(out, "signals"), "a") as f:
        f.write("TERM\\n")
signal.signal(signal.SIGTERM, on_term)
open(os.path.join(out, "ready"), "w").close()
deadline = time.monotonic() + 60
while not got and time.monotonic() < deadline:
    time.sleep(0.02)
time.sleep(0.5)          # a second SIGTERM (a forwarded copy) would arrive by now
sys.exit(75)
"""


@pytest.mark.parametrize("how", ["run_job.sh", "task run:"])
def test_a_process_group_sigterm_keeps_exit_75(how, tmp_path):
    """systemd, containers and some schedulers SIGTERM the whole process group. The shell used
    to die of it (143, which recover_on_exit_codes [75] never matches) while the job saved and
    exited 75; now the job replaces the shells (exec), gets the signal exactly once, and its 75
    is what the caller sees."""
    bin_dir = tmp_path / "fakebin"
    write_exe(bin_dir / "python3", SIGTERM_PYTHON)
    records = tmp_path / "records"
    records.mkdir()
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_RECORD_DIR": str(records)}
    for key in ("SKYPILOT_NODE_IPS", "SKYPILOT_NODE_RANK", "JAX_CLUSTER"):
        env.pop(key, None)
    if how == "run_job.sh":
        command = ["bash", "launch/run_job.sh", "train", "--workdir=/w"]
    else:                            # the task's run: as SkyPilot hands it to bash
        config = yaml.safe_load((LAUNCH / "train_tpu.yaml").read_text())
        env.update({k: str(VALUES.get(k, v or "")) for k, v in config["envs"].items()})
        command = ["bash", "-c", config["run"]]
    proc = subprocess.Popen(command, cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (records / "ready").exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == EXIT_RESUME, err
    assert (records / "signals").read_text() == "TERM\n"      # once, not forwarded twice


@pytest.mark.parametrize("job, arg", [("knn", "--workdir=/w"), ("linear_probe", "--workdir=/w"),
                                      ("generate", "--config.output_dir=/o")])
def test_run_job_gives_every_flagged_job_the_coordinator(job, arg, fake_python3):
    env, records = fake_python3
    result = subprocess.run(["bash", "launch/run_job.sh", job, arg], cwd=REPO, capture_output=True,
                            text=True, env={**env, "JAX_CLUSTER": "skypilot", "COORDINATOR_PORT": "2222",
                                            "SKYPILOT_NODE_IPS": "a\nb\nc", "SKYPILOT_NODE_RANK": "2"})
    assert result.returncode == 0, result.stderr
    (run,) = fake_runs(records)
    assert run["argv"] == ["-m", f"stablerep_jax.{job}", arg, "--coordinator_address=a:2222",
                           "--num_processes=3", "--process_id=2"]


@pytest.mark.parametrize("job, cluster, message", [
    ("fly", "auto", "unknown job 'fly'"),
    ("convert", "skypilot", "convert takes no --coordinator_address"),
    ("train", "slurm", "JAX_CLUSTER must be auto or skypilot"),
])
def test_run_job_refuses_clearly(job, cluster, message, fake_python3):
    env, records = fake_python3
    result = subprocess.run(["bash", "launch/run_job.sh", job], cwd=REPO, capture_output=True, text=True,
                            env={**env, "JAX_CLUSTER": cluster, "SKYPILOT_NODE_IPS": "a\nb", "SKYPILOT_NODE_RANK": "0"})
    assert result.returncode == 2 and message in result.stderr
    assert not fake_runs(records)        # the job never started


# --------------------------------------------------------------------------------------------
# gpu_slurm.sh

TRAIN_ARGS = ["--job", "train", "--config", "configs/stablerep.py:tiny", "--workdir", "gs://bkt/runs/t1"]
PASS = ["--config.data.train_files=gs://bkt/data/*.tfrecord", "--config.total_steps=7"]


def slurm(*args, env=None):
    return subprocess.run(["bash", str(LAUNCH / "gpu_slurm.sh"), *map(str, args)], capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, timeout=120)


def ok(result):
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


def commands(stdout: str) -> list[str]:
    return [line[2:] for line in stdout.splitlines() if line.startswith("+ ")]


def _sbatch_script(stdout: str) -> str:
    start = stdout.index("<<'EOF'\n") + len("<<'EOF'\n")
    return stdout[start:stdout.index("\nEOF\n", start)]


@pytest.mark.parametrize("args,message", [
    (["--job", "train", "--workdir", "w"], "missing required option --config"),
    (["--config", "configs/stablerep.py"], "missing required option --job (generate import_images"),
    (["--job", "fly", "--config", "configs/stablerep.py"], "--job: unknown job 'fly'; the jobs are: generate"),
    (["--job", "knn", "--config", "configs/linear_probe.py"], "missing required option --workdir for --job knn"),
    (["--job", "train", "--config", "configs/nope.py", "--workdir", "w"], "config file 'configs/nope.py'"),
    ([*TRAIN_ARGS, "--frobnicate"], "unknown option '--frobnicate'"),
    ([*TRAIN_ARGS, "--config.total_steps=7"], "flags for the job itself go after '--'"),
    ([*TRAIN_ARGS, "--nodes"], "option --nodes needs a value"),
    ([*TRAIN_ARGS, "--nodes", "two"], "option --nodes: two is not valid"),
    ([*TRAIN_ARGS, "--port", "80"], "--port must be in 1024-65535"),
    # Values that go on #SBATCH lines: a newline injects a line, a space cuts the option.
    ([*TRAIN_ARGS, "--partition", "gpu\n#SBATCH --uid=0"], "--partition $'gpu\\n#SBATCH --uid=0' may only hold"),
    ([*TRAIN_ARGS, "--account", "lab\nrm -rf ~"], "--account $'lab\\nrm -rf ~' may only"),
    ([*TRAIN_ARGS, "--partition", "gpu a100"], "--partition 'gpu a100' may only hold"),
    ([*TRAIN_ARGS, "--log-dir", "/shared/my logs"], "--log-dir '/shared/my logs' holds whitespace"),
    ([*TRAIN_ARGS, "--sbatch-arg", "--x\n#SBATCH --uid=0"], "must be one sbatch option"),
])
def test_gpu_slurm_bad_arguments_fail_clearly(args, message):
    result = slurm(*args, "--dry-run")
    assert result.returncode == 2, result.stdout
    assert message in result.stderr
    assert not commands(result.stdout)


def test_gpu_slurm_dry_run(tmp_path):
    result = ok(slurm("--nodes", "4", "--gpus-per-node", "8", "--partition", "gpu", "--account", "lab",
                      "--time", "48:00:00", "--sbatch-arg=--exclusive", "--log-dir", tmp_path / "logs",
                      *TRAIN_ARGS, "--dry-run", "--", *PASS))
    script = _sbatch_script(result.stdout)
    for line in ["#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --partition=gpu", "#SBATCH --account=lab", "#SBATCH --time=48:00:00",
                 "#SBATCH --exclusive", "export TF_FORCE_GPU_ALLOW_GROWTH=true",
                 "export XLA_PYTHON_CLIENT_MEM_FRACTION=.90"]:
        assert line in script.splitlines()
    assert 'scontrol show hostnames "$SLURM_JOB_NODELIST"' in script
    (srun,) = [argv_of(line[:-len(" || rc=$?")]) for line in script.splitlines() if line.startswith("srun ")]
    task = srun.index("stablerep-task")
    assert srun[task - 1] == ('exec "$@" --coordinator_address="$COORDINATOR_ADDRESS" '
                              '--num_processes="$SLURM_NTASKS" --process_id="$SLURM_PROCID"')
    assert srun[task + 1:] == [f"{REPO}/.venv/bin/python", "-m", "stablerep_jax.train",
                               "--config=configs/stablerep.py:tiny", "--workdir=gs://bkt/runs/t1", *PASS]
    assert f"--output={tmp_path}/logs/train-%j-%N.log" in srun
    assert argv_of(commands(result.stdout)[1]) == [".venv/bin/python", "-m", "pip", "install", "-e", ".[cuda12]"]
    sbatch = argv_of(commands(result.stdout)[-1])
    assert sbatch[0] == "sbatch" and sbatch[1].startswith(f"{tmp_path}/logs/stablerep-train-")
    assert not (tmp_path / "logs").exists()      # nothing written


def test_gpu_slurm_generate_gets_the_coordinator_and_no_workdir():
    """generate writes to its config's output_dir (no --workdir needed) and joins its hosts
    through the same flags as train; it is not requeued (only train saves on SIGTERM)."""
    result = ok(slurm("--job", "generate", "--config", "configs/generate.py", "--dry-run", "--",
                      "--config.output_dir=/shared/gen"))
    script = _sbatch_script(result.stdout)
    assert "#SBATCH --requeue" not in script and "--workdir" not in script
    (srun,) = [argv_of(line[:-len(" || rc=$?")]) for line in script.splitlines() if line.startswith("srun ")]
    task = srun.index("stablerep-task")
    assert srun[task - 1] == ('exec "$@" --coordinator_address="$COORDINATOR_ADDRESS" '
                              '--num_processes="$SLURM_NTASKS" --process_id="$SLURM_PROCID"')
    assert srun[-4:] == ["-m", "stablerep_jax.generate", "--config=configs/generate.py",
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


@pytest.mark.parametrize("job", ["train", "knn"])
def test_gpu_slurm_submits_a_script_that_starts_every_process(tmp_path, job):
    bin_dir = tmp_path / "fakebin"
    submitted = tmp_path / "submitted.sbatch"
    write_exe(bin_dir / "sbatch", f'#!/usr/bin/env bash\ncp "$1" {submitted}\necho "Submitted batch job 42"\n')
    write_exe(bin_dir / "srun", FAKE_SRUN)
    write_exe(bin_dir / "scontrol", FAKE_SCONTROL)
    venv = tmp_path / "venv"
    write_exe(venv / "bin" / "python", FAKE_PYTHON)
    path = f"{bin_dir}:{os.environ['PATH']}"
    args = ["--job", job, "--config", "configs/stablerep.py:tiny", "--workdir", "gs://bkt/runs/t1"]
    result = ok(slurm("--nodes", "2", "--port", "23456", "--venv", venv, "--no-install",
                      "--log-dir", tmp_path / "logs", *args, "--", *PASS, env={"PATH": path}))
    assert "Submitted batch job 42" in result.stdout
    (kept,) = (tmp_path / "logs").glob(f"stablerep-{job}-*.sbatch")   # the script stays for reruns
    assert kept.read_text() == submitted.read_text()

    records = tmp_path / "records"
    records.mkdir()
    env = {"PATH": path, "SLURM_JOB_NODELIST": "gpu[007-008]", "SLURM_NTASKS": "2",
           "FAKE_RECORD_DIR": str(records), "XLA_FLAGS": ""}
    ok(subprocess.run(["bash", str(submitted)], capture_output=True, text=True, env={**os.environ, **env}))
    runs = fake_runs(records)
    assert [r["env"]["SLURM_PROCID"] for r in runs] == ["0", "1"]
    for proc, record in enumerate(runs):
        assert record["argv"] == ["-m", f"stablerep_jax.{job}", "--config=configs/stablerep.py:tiny",
                                  "--workdir=gs://bkt/runs/t1", *PASS, "--coordinator_address=gpu007:23456",
                                  "--num_processes=2", f"--process_id={proc}"]
        assert record["env"]["TF_FORCE_GPU_ALLOW_GROWTH"] == "true"
        assert record["env"]["XLA_FLAGS"] == "--xla_gpu_enable_latency_hiding_scheduler=true"


@pytest.mark.parametrize("job_exit, requeued", [(EXIT_RESUME, True), (1, False), (0, False)])
def test_gpu_slurm_requeues_a_train_job_that_stopped_to_be_resumed(tmp_path, job_exit, requeued):
    """Exit 75 (SIGTERM: preemption, or the --signal notice before the time limit) requeues
    the job; its exit code is the batch script's either way."""
    bin_dir = tmp_path / "fakebin"
    write_exe(bin_dir / "srun", FAKE_SRUN)
    write_exe(bin_dir / "scontrol", FAKE_SCONTROL)
    venv = tmp_path / "venv"
    write_exe(venv / "bin" / "python", FAKE_PYTHON)
    result = ok(slurm("--venv", venv, "--no-install", "--log-dir", tmp_path / "logs",
                      *TRAIN_ARGS, "--dry-run", "--", *PASS))
    script = _sbatch_script(result.stdout)
    assert "#SBATCH --requeue" in script.splitlines()
    assert "#SBATCH --signal=TERM@300" in script.splitlines()
    (tmp_path / "job.sbatch").write_text(script)
    records = tmp_path / "records"
    records.mkdir()
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "gpu[007-008]",
           "SLURM_NTASKS": "1", "SLURM_JOB_ID": "42", "FAKE_RECORD_DIR": str(records),
           "FAKE_JOB_EXITS": str(job_exit)}
    run = subprocess.run(["bash", str(tmp_path / "job.sbatch")], capture_output=True, text=True,
                         env={**os.environ, **env})
    assert run.returncode == job_exit, run.stderr
    scontrol = records / "scontrol.txt"
    assert (scontrol.read_text() == "requeue 42\n") if requeued else not scontrol.exists()
