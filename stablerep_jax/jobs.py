"""The package's jobs, for launchers: `python -m stablerep_jax.jobs [JOB]`.

The launch files (launch/*.yaml, launch/run_job.sh, launch/gpu_slurm.sh) validate a job name
here instead of keeping a list of their own, and ask whether the job takes the explicit
multi-process flags of `cli.define_job_flags` (`--coordinator_address`, `--num_processes`,
`--process_id`). That is read from the job's source, so this needs neither JAX nor an install:
`PYTHONPATH=CHECKOUT python3 -m stablerep_jax.jobs train` works on a login node.

No argument: prints the jobs, one per line. `JOB`: prints `cluster-flags` when JOB takes them,
`auto` when it finds its processes itself (TPU / SLURM detection). `--requires-workdir JOB`:
prints `yes` when JOB needs `--workdir`, `no` when its config names its output. An unknown JOB
exits 2 naming the jobs.
"""
from __future__ import annotations

import ast
import importlib.util
import os
import sys

# Every `python -m stablerep_jax.<job>` entry point (tests check each resolves and that no
# module with a `cli.run` main is missing).
JOBS = ("generate", "import_images", "train", "linear_probe", "knn", "convert", "demo")


def check_job(job: str) -> str:
    """Returns the module name of `job`; ValueError naming the valid jobs otherwise."""
    if job not in JOBS:
        raise ValueError(f"unknown job {job!r}; the jobs are: {', '.join(JOBS)}")
    return f"stablerep_jax.{job}"


def _job_flag_calls(job: str) -> list[ast.Call]:
    """The job module's calls of `define_job_flags`, read from its source with `ast`, without
    importing the job."""
    spec = importlib.util.find_spec(check_job(job))
    path = spec.origin
    if spec.submodule_search_locations is not None:     # a package (the demo): its __main__
        path = os.path.join(os.path.dirname(path), "__main__.py")
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    calls = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name == "define_job_flags":
                calls.append(node)
    return calls


def takes_cluster_flags(job: str) -> bool:
    """True when the job's module calls `define_job_flags` (so it accepts the coordinator
    flags)."""
    return bool(_job_flag_calls(job))


def requires_workdir(job: str) -> bool:
    """True when the job's `define_job_flags` call defines the required `--workdir` (any help
    text but None; generate and import_images write to their config's output_dir instead)."""
    for call in _job_flag_calls(job):
        args = call.args or [kw.value for kw in call.keywords if kw.arg == "workdir_help"]
        if not (args and isinstance(args[0], ast.Constant) and args[0].value is None):
            return True
    return False


def main(argv: list[str]) -> int:
    if len(argv) == 0:
        print("\n".join(JOBS))
        return 0
    workdir = argv[0] == "--requires-workdir"
    if len(argv) != 1 + workdir:
        print("usage: python -m stablerep_jax.jobs [[--requires-workdir] JOB]", file=sys.stderr)
        return 2
    try:
        if workdir:
            print("yes" if requires_workdir(argv[1]) else "no")
        else:
            print("cluster-flags" if takes_cluster_flags(argv[0]) else "auto")
    except ValueError as e:
        print(f"stablerep_jax.jobs: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
