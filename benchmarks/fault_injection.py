r"""Fault injection: SIGKILL `generate`, `import_images` and `train` at random points, resume each
by rerunning the same command, and check that every completed output equals an uninterrupted
run's; or, with --signals, send SIGTERM notices to these jobs and `linear_probe` run through
launch/run_job.sh and requeue them on exit 75, as the managed jobs are.

  python benchmarks/fault_injection.py --kills 21 --seed 0     # SIGKILL study (RESULTS.md)
  python benchmarks/fault_injection.py --signals 12 --seed 0 --gen_captions 8 \
      --import_captions 300 --train_steps 8 --probe_epochs 12  # SIGTERM study (README table)
  python benchmarks/fault_injection.py --jobs import_images --kills 2 --import_captions 300
                                                       # the smoke run of test_fault_injection.py

--signals N: N notices split over the jobs, of three kinds in turn: `single` (one SIGTERM to the
job's pid), `double` (a second one 0.2-1.5 s after the first) and `group` (SIGTERM to the whole
process group, as systemd, containers and some schedulers send it). Each job runs as
`bash launch/run_job.sh JOB FLAGS...` in its own session (run_job.sh execs the job, so the pid
is the job's once it has checked its arguments). A notice lands at a seeded random point: half
uniform over the uninterrupted run's wall time (start-up, compilation, work), half after a
random number of further progress units as the SIGKILL study picks. The job must exit 75
(stopped to be resumed: requeued, the same command rerun) or 0 (finished); anything else is a
failure. Up to --max_kills_per_run notices per output, then the output is rerun until it exits
0 and compared with the uninterrupted run's (as below; the probe: results.json but its timing,
every metrics row and the best head's bytes). Reported per job: notices of each kind, runs
(processes started), exit codes, requeues, units redone (train steps / probe epochs logged past
the newest finished checkpoint when the job stopped, which its rerun repeats; shards of
generate / import_images that a rerun wrote again), outputs compared and whether all were equal.
The probe (cached features) reads a 1-block random ViT (tests/probe_fixtures.py) on 48 + 48
tinted 40 px images, --probe_epochs epochs, evaluated at every third.

Each job runs through its real command line (`python -m stablerep_jax.<job> ...`) on CPU with
one device:
  generate       a tiny random Stable Diffusion (tests/tiny_sd.py, diffusers format, loaded by
                 `from_pretrained`), --gen_captions captions, 2 per shard, K=2 PNGs per caption;
  import_images  the reference's layout (CSV of relative_path,caption + one root folder per seed)
                 holding seeded random 32px PNGs, --import_captions captions, 25 per shard;
  train          the `tiny` preset on the uninterrupted import output, --train_steps steps, a
                 checkpoint every 2 steps, a metrics line every step.
One uninterrupted run per job gives the expected output, its length in progress units (finished
shards; logged steps) and its timing. Then, until the job's share of --kills has hit a running
process, a fresh output is made: the command is started, SIGKILLed at a seeded random point,
and rerun, up to --max_kills_per_run times, then rerun until it exits by itself. A kill point is a
random number of further progress units (0: during start-up and compilation) plus a random
delay of up to one unit's time, so kills land during start-up, sampling, encoding, shard writes
and renames, train steps and checkpoint saves. Every completed output is compared with the
uninterrupted one:
  generate, import_images  the set of (caption_id, caption, image bytes) over all shards is the
                           reference's (compared as sets, so the caption -> shard layout does not
                           matter); every caption id appears exactly once; manifest.json says
                           complete; no temporary file is left behind;
  train                    metrics.jsonl has every step's loss equal, bit for bit, to the
                           uninterrupted run's (compared by step; lines that repeat a step after
                           a resume are counted and reported as a failure).
Prints one table row per job (kills; kills that left a half-written file behind, i.e. a
temporary shard or an unfinished checkpoint; resumes; completed runs compared; outputs equal;
wall time) and exits 0 when every comparison held, 1 otherwise.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

os.environ.setdefault("JAX_PLATFORMS", "cpu")    # this process only writes the tiny model
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))
sys.path.insert(0, REPO)

JOBS = ("generate", "import_images", "train", "linear_probe")
KILL_JOBS = JOBS[:3]             # the SIGKILL study's default jobs
SIGNALS = ("single", "double", "group")   # SIGTERM kinds of the --signals study
EXIT_RESUME = 75                 # stablerep_jax.cli.EXIT_RESUME: stopped to be resumed
STOP_TIMEOUT_SECONDS = 600       # a signalled job must exit by itself within this
SHARD_SUFFIX = ".tfrecord"
TMP_SUFFIX = ".tmp"
POLL_SECONDS = 0.05
RUN_TIMEOUT_SECONDS = 900
IMAGE_SIZE = 32                  # train's tiny preset crops 32px
IMAGES_PER_CAPTION = 2
# Subprocesses: CPU only, one device, TF quiet, no network.
ENV = {"JAX_PLATFORMS": "cpu", "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "2",
       "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "XLA_FLAGS": ""}


def _args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kills", type=int, default=24, help="SIGKILLs in all, split over the jobs")
    p.add_argument("--signals", type=int, default=0,
                   help="instead of SIGKILLs: this many SIGTERM notices in all (single, double "
                        "and process-group in turn), split over the jobs, each run through "
                        "launch/run_job.sh and requeued on exit 75")
    p.add_argument("--jobs", help=f"comma-separated subset of {JOBS} (default: "
                                  f"{','.join(KILL_JOBS)}; with --signals all four)")
    p.add_argument("--probe_epochs", type=int, default=12)
    p.add_argument("--seed", type=int, default=0, help="seeds the kill points and the images")
    p.add_argument("--max_kills_per_run", type=int, default=3,
                   help="kills before a run is left to finish and its output is compared")
    p.add_argument("--gen_captions", type=int, default=16)
    p.add_argument("--import_captions", type=int, default=1000)
    p.add_argument("--train_steps", type=int, default=16)
    p.add_argument("--workdir", help="keep everything here (default: a temporary directory)")
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args(argv)
    if args.jobs is None:
        args.jobs = ",".join(JOBS if args.signals else KILL_JOBS)
    args.jobs = [j for j in args.jobs.split(",") if j]
    unknown = sorted(set(args.jobs) - set(JOBS))
    if unknown or not args.jobs:
        p.error(f"--jobs={','.join(args.jobs)}: choose from {','.join(JOBS)}")
    if args.signals and args.signals < len(args.jobs):
        p.error(f"--signals={args.signals}: need at least one per job ({len(args.jobs)})")
    if not args.signals and args.kills < len(args.jobs):
        p.error(f"--kills={args.kills}: need at least one per job ({len(args.jobs)})")
    if args.import_captions < 8 or args.gen_captions < 1 or args.train_steps < 2:
        p.error("need --import_captions >= 8 (a tiny train step), --gen_captions >= 1 and "
                "--train_steps >= 2")
    return args


# ------------------------------------------------------------ progress, outputs and comparisons

def shard_progress(output: str) -> int:
    """Finished shards (final names) in a generate / import_images output."""
    if not os.path.isdir(output):
        return 0
    return sum(n.endswith(SHARD_SUFFIX) for n in os.listdir(output))


def read_losses(workdir: str) -> tuple[dict, int]:
    """step -> loss from metrics.jsonl (a later line of a step wins) and the number of lines
    that repeat a step. A line being written (no newline yet) is not read."""
    losses, repeats = {}, 0
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return losses, repeats
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.endswith("\n"):
                break
            row = json.loads(line)
            if "loss" in row:
                repeats += row["step"] in losses
                losses[row["step"]] = row["loss"]
    return losses, repeats


def train_progress(workdir: str) -> int:
    """Logged steps in a train workdir."""
    return len(read_losses(workdir)[0])


def partial_shards(output: str) -> int:
    """Temporary files (shards or json being written) in a generate / import_images output."""
    return sum(n.endswith(TMP_SUFFIX) for n in _names(output))


def partial_checkpoints(workdir: str) -> int:
    """Checkpoints being written in a train workdir: entries of `checkpoints/` that orbax's
    manager does not list as finished steps (its temporary or uncommitted step directories)."""
    folder = os.path.join(workdir, "checkpoints")
    names = _names(folder)
    if not names:
        return 0
    from stablerep_jax import checkpoint
    return len(names) - len(checkpoint.finished_steps(workdir))


def _names(folder: str) -> list[str]:
    return os.listdir(folder) if os.path.isdir(folder) else []


def read_caption_records(output: str) -> tuple[list, list[str]]:
    """Every record of every finished shard as (caption_id, caption, image bytes) and the
    temporary files left in the directory."""
    from stablerep_jax.data import records
    rows = []
    for name in sorted(os.listdir(output)):
        if name.endswith(SHARD_SUFFIX):
            for rec in records.read_records(os.path.join(output, name)):
                rows.append((rec.caption_id, rec.caption, tuple(rec.images)))
    temps = sorted(n for n in os.listdir(output) if n.endswith(TMP_SUFFIX))
    return rows, temps


def compare_records(output: str, expected: list) -> list[str]:
    """How a completed shard output differs from the uninterrupted one (empty: equal)."""
    rows, temps = read_caption_records(output)
    problems = []
    counts = collections.Counter(cid for cid, _, _ in rows)
    duplicated = sorted(cid for cid, n in counts.items() if n > 1)
    missing = sorted({cid for cid, _, _ in expected} - set(counts))
    if duplicated:
        problems.append(f"caption ids written more than once: {duplicated[:10]}")
    if missing:
        problems.append(f"caption ids missing: {missing[:10]}")
    differ = sorted({row[0] for row in set(rows) ^ set(expected)})
    if differ:
        problems.append(f"caption, caption id or image bytes differ for ids {differ[:10]}")
    with open(os.path.join(output, "manifest.json"), encoding="utf-8") as f:
        if not json.load(f).get("complete"):
            problems.append("manifest.json does not say complete")
    if temps:
        problems.append(f"temporary files left behind: {temps[:5]}")
    return problems


def compare_losses(workdir: str, expected: dict) -> list[str]:
    """How a completed train run's logged losses differ from the uninterrupted run's."""
    losses, repeats = read_losses(workdir)
    problems = []
    if sorted(losses) != sorted(expected):
        problems.append(f"logged steps differ: missing {sorted(set(expected) - set(losses))[:10]}"
                        f", extra {sorted(set(losses) - set(expected))[:10]}")
    differ = [s for s in sorted(set(losses) & set(expected)) if losses[s] != expected[s]]
    if differ:
        s = differ[0]
        problems.append(f"losses differ at {len(differ)} steps (step {s}: {losses[s]!r}, "
                        f"uninterrupted {expected[s]!r})")
    if repeats:
        problems.append(f"{repeats} metrics.jsonl lines repeat an earlier step")
    return problems


@dataclasses.dataclass(frozen=True)
class Job:
    """A job under test: its command for an output directory, how far an output has got, what
    an output holds, and how two outputs differ."""
    name: str
    command: object          # output dir -> argv
    progress: object         # output dir -> int
    contents: object         # output dir -> comparable contents
    compare: object          # (output dir, expected contents) -> list of problems
    partial: object          # output dir -> files a kill left half-written


# ------------------------------------------------------------------- running and killing jobs

@dataclasses.dataclass(frozen=True)
class KillPoint:
    """Kill once the output has `units` more progress units than at the start, `delay` s later."""
    units: int
    delay: float


@dataclasses.dataclass
class Attempt:
    returncode: int
    seconds: float
    killed: bool
    first_unit_seconds: float | None    # when the first new progress unit appeared
    log_path: str
    partial_after_kill: int = 0         # half-written files the kill left behind

    def log_tail(self, lines: int = 15) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return "".join(f.readlines()[-lines:])


def run_attempt(job: Job, output: str, kill: KillPoint | None, log_path: str) -> Attempt:
    """Runs the job's command once; SIGKILLs it at `kill` unless it ends first."""
    command = job.command(output)
    start_units = job.progress(output)
    reached_at = 0.0 if kill is not None and kill.units == 0 else None
    first_unit = None
    start = time.perf_counter()
    killed = False
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(command, cwd=REPO, env={**os.environ, **ENV}, stdout=log,
                                stderr=subprocess.STDOUT)
        while proc.poll() is None:
            now = time.perf_counter() - start
            done = job.progress(output) - start_units
            if first_unit is None and done > 0:
                first_unit = now
            if kill is not None and reached_at is None and done >= kill.units:
                reached_at = now
            if reached_at is not None and now >= reached_at + kill.delay:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                killed = True
                break
            if now > RUN_TIMEOUT_SECONDS:
                proc.kill()
                proc.wait()
                raise RuntimeError(f"{' '.join(command)} ran over {RUN_TIMEOUT_SECONDS} s "
                                   f"(log: {log_path})")
            time.sleep(POLL_SECONDS)
    return Attempt(proc.returncode, time.perf_counter() - start, killed, first_unit, log_path,
                   job.partial(output) if killed else 0)


def pick_kill(rng: np.random.Generator, done: int, total: int, reference: Attempt) -> KillPoint:
    """A random point of a run that starts with `done` of `total` units: a number of further
    units in [0, total - done) and a delay of up to one unit's time (0 units: up to the
    reference's time to its first unit, i.e. start-up and compilation)."""
    units = int(rng.integers(0, max(total - done, 1)))
    first = reference.first_unit_seconds or reference.seconds / 2
    per_unit = max(reference.seconds - first, 1e-3) / max(total, 1)
    return KillPoint(units, float(rng.uniform(0.0, first if units == 0 else per_unit)))


@dataclasses.dataclass
class JobResult:
    job: str
    kills: int = 0
    resumes: int = 0
    runs_compared: int = 0
    equal: bool = True
    seconds: float = 0.0
    reference_seconds: float = 0.0
    kills_leaving_partial_files: int = 0
    kill_points: list = dataclasses.field(default_factory=list)   # (units done, units, delay)
    problems: list = dataclasses.field(default_factory=list)


def exercise(job: Job, root: str, kills: int, max_kills_per_run: int, rng) -> JobResult:
    """The uninterrupted reference run, then killed-and-resumed runs until `kills` kills hit a
    running process; each completed run's output is compared with the reference's."""
    result = JobResult(job.name)
    start = time.perf_counter()
    ref_out = os.path.join(root, f"{job.name}_reference")
    reference = run_attempt(job, ref_out, None, ref_out + ".log")
    if reference.returncode != 0:
        raise RuntimeError(f"{job.name}: the uninterrupted run exited {reference.returncode}:\n"
                           f"{reference.log_tail()}")
    result.reference_seconds = reference.seconds
    expected = job.contents(ref_out)
    total = job.progress(ref_out)
    run = 0
    while result.kills < kills:
        out = os.path.join(root, f"{job.name}_run{run}")
        budget = min(max_kills_per_run, kills - result.kills)
        for i in range(budget + 1):
            kill = None
            if i < budget and job.progress(out) < total:
                kill = pick_kill(rng, job.progress(out), total, reference)
            done = job.progress(out)
            attempt = run_attempt(job, out, kill, f"{out}.attempt{i}.log")
            if attempt.killed:
                result.kills += 1
                result.resumes += 1
                result.kills_leaving_partial_files += attempt.partial_after_kill > 0
                result.kill_points.append((done, kill.units, round(kill.delay, 3)))
                continue
            if attempt.returncode != 0:
                result.problems.append(f"run {run} attempt {i} exited {attempt.returncode}:\n"
                                       f"{attempt.log_tail()}")
            break
        problems = job.compare(out, expected) if not result.problems else []
        result.runs_compared += 1
        result.problems += [f"run {run}: {p}" for p in problems]
        run += 1
        if result.problems:
            break
    result.equal = not result.problems
    result.seconds = time.perf_counter() - start
    return result


# ---------------------------------------------------------------------------------- the inputs

def write_captions(path: str, count: int) -> str:
    colours = ("red", "green", "blue", "yellow", "purple", "orange")
    things = ("cat", "dog", "boat", "house", "tree", "bicycle", "car")
    with open(path, "w", encoding="utf-8") as f:
        for i in range(count):
            f.write(f"a {colours[i % 6]} {things[i % 7]} number {i}\n")
    return path


def write_import_layout(root: str, num_captions: int, seed: int) -> tuple[str, list[str]]:
    """The reference's layout with seeded random PNGs: root/train.csv (relative_path,caption)
    and one root folder per seed. Returns (csv path, roots)."""
    from PIL import Image
    gen = np.random.default_rng(seed)
    roots = [os.path.join(root, f"seed{j}") for j in range(IMAGES_PER_CAPTION)]
    csv_path = os.path.join(root, "train.csv")
    os.makedirs(root, exist_ok=True)
    with open(csv_path, "w", encoding="utf-8") as csv:
        csv.write("relative_path,caption\n")
        for i in range(num_captions):
            rel = f"{i // 100:03d}/{i:06d}.png"
            for folder in roots:
                path = os.path.join(folder, rel)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                pixels = gen.integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
                buf = io.BytesIO()
                Image.fromarray(pixels).save(buf, format="PNG")
                with open(path, "wb") as f:
                    f.write(buf.getvalue())
            csv.write(f"{rel},caption number {i}\n")
    return csv_path, roots


def _python(job: str, config: str, *overrides: str) -> list[str]:
    return [sys.executable, "-m", f"stablerep_jax.{job}", f"--config={config}", *overrides]


def generate_job(model: str, captions: str) -> Job:
    return Job("generate", lambda out: _python(
        "generate", "configs/generate.py:tiny", f"--config.model={model}",
        f"--config.captions={captions}", f"--config.output_dir={out}",
        f"--config.images_per_caption={IMAGES_PER_CAPTION}", "--config.captions_per_shard=2",
        "--config.num_workers=2", "--config.contact_sheet_captions=4"),
        shard_progress, lambda out: read_caption_records(out)[0], compare_records, partial_shards)


def import_job(csv_path: str, roots: list[str]) -> Job:
    return Job("import_images", lambda out: _python(
        "import_images", "configs/import_images.py", f"--config.csv={csv_path}",
        f"--config.roots={','.join(roots)}", f"--config.output_dir={out}",
        "--config.captions_per_shard=25", "--config.num_workers=2"),
        shard_progress, lambda out: read_caption_records(out)[0], compare_records, partial_shards)


def train_job(train_files: str, steps: int) -> Job:
    def losses(workdir):
        found, repeats = read_losses(workdir)
        if repeats:
            raise RuntimeError(f"{workdir}: the uninterrupted run logged {repeats} repeated steps")
        return found
    return Job("train", lambda workdir: _python(
        "train", "configs/stablerep.py:tiny", f"--workdir={workdir}",
        f"--config.data.train_files={train_files}", f"--config.total_steps={steps}",
        "--config.checkpoint_every=2", "--config.log_every=1"),
        train_progress, losses, compare_losses, partial_checkpoints)


def probe_progress(workdir: str) -> int:
    """Epochs logged in a linear_probe workdir (metrics.jsonl, one row per epoch)."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return 0
    with open(path, encoding="utf-8") as f:
        return len({json.loads(line)["step"] for line in f if line.endswith("\n")})


def probe_saved(workdir: str) -> int:
    """The newest epoch saved in probe_checkpoints (orbax's finished step directories)."""
    steps = [int(n) for n in _names(os.path.join(workdir, "probe_checkpoints")) if n.isdigit()]
    return max(steps, default=0)


def partial_probe_checkpoints(workdir: str) -> int:
    return sum(not n.isdigit() for n in _names(os.path.join(workdir, "probe_checkpoints")))


def probe_contents(workdir: str) -> dict:
    """results.json without its timing, every metrics row and the best head's arrays."""
    with open(os.path.join(workdir, "results.json"), encoding="utf-8") as f:
        results = {k: v for k, v in json.load(f).items() if k != "seconds"}
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    with np.load(os.path.join(workdir, "best_head.npz")) as head:
        arrays = {k: head[k].tobytes() for k in head.files}
    return {"results": results, "metrics": rows, "best_head": arrays}


def compare_probe(workdir: str, expected: dict) -> list[str]:
    if not os.path.exists(os.path.join(workdir, "results.json")):
        return ["no results.json"]
    found = probe_contents(workdir)
    return [f"{key} differs from the uninterrupted run's" for key in expected
            if found[key] != expected[key]]


def probe_job(encoder: str, folder: str, epochs: int) -> Job:
    return Job("linear_probe", lambda workdir: _python(
        "linear_probe", "configs/linear_probe.py:folder", f"--config.checkpoint={encoder}",
        f"--config.dataset=folder:{folder}", "--config.mode=cached_features",
        f"--config.epochs={epochs}", f"--config.eval_every={max(epochs // 3, 1)}",
        "--config.batch_size=48", "--config.extract_batch_size=40",
        "--config.base_lrs=(0.03,0.3,3.0)", f"--workdir={workdir}"),
        probe_progress, probe_contents, compare_probe, partial_probe_checkpoints)


# --------------------------------------------------------------- SIGTERM notices via run_job.sh

def through_run_job(command: list[str]) -> list[str]:
    """The job's command as the managed jobs run it: bash launch/run_job.sh JOB FLAGS..."""
    job = command[2].rsplit(".", 1)[1]
    return ["bash", os.path.join(REPO, "launch", "run_job.sh"), job, *command[3:]]


def train_saved(workdir: str) -> int:
    from stablerep_jax import checkpoint
    if not os.path.isdir(os.path.join(workdir, "checkpoints")):
        return 0
    return max(checkpoint.finished_steps(workdir), default=0)


def shard_files(output: str) -> dict:
    """Finished shard name -> (inode, mtime): a shard written again gets a new pair."""
    found = {}
    for name in _names(output):
        if name.endswith(SHARD_SUFFIX):
            st = os.stat(os.path.join(output, name))
            found[name] = (st.st_ino, st.st_mtime_ns)
    return found


def redone_after_stop(job: Job, output: str) -> int:
    """Units a rerun repeats after a stop: logged steps/epochs past the newest saved checkpoint
    (train, linear_probe). Shard jobs count rewritten shards in exercise_signals instead."""
    if job.name == "train":
        return max(train_progress(output) - train_saved(output), 0)
    if job.name == "linear_probe":
        return max(probe_progress(output) - probe_saved(output), 0)
    return 0


def _is_job(pid: int) -> bool:
    """Whether run_job.sh has exec'd the job (the signal reaches the job, not the script)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"run_job.sh" not in f.read()
    except OSError:
        return False


def send_notice(proc: subprocess.Popen, kind: str) -> None:
    if kind == "group":
        os.killpg(proc.pid, signal.SIGTERM)
    else:
        proc.send_signal(signal.SIGTERM)


def pick_notice(rng, done: int, total: int, reference: Attempt) -> KillPoint:
    """Half the notices at a point uniform in the uninterrupted run's wall time (mostly
    start-up and compilation at these sizes, as on a pod reading gs://), half as pick_kill
    (uniform over the remaining progress units)."""
    if rng.uniform() < 0.5:
        return KillPoint(0, float(rng.uniform(0.0, reference.seconds)))
    return pick_kill(rng, done, total, reference)


@dataclasses.dataclass
class Notice:
    kind: str                # single / double / group
    units_done: int          # progress when the run started
    units: int               # further units before the notice
    delay: float
    exit_code: int = 0
    reached_job: bool = True  # False: it landed while run_job.sh was still checking the job
    redone: int = 0
    at_units: int = 0        # progress when it was sent


def run_signalled_attempt(job: Job, output: str, kill: KillPoint | None, kind: str,
                          log_path: str, rng) -> tuple[Attempt, bool, bool, int]:
    """Runs the job through run_job.sh in its own process group once; sends the SIGTERM notice
    at `kill` (a second one 0.2-1.5 s later for `double`) and waits for the job to exit by
    itself. Returns (attempt, whether a notice was sent, whether the job had been exec'd)."""
    command = through_run_job(job.command(output))
    start_units = job.progress(output)
    reached_at = 0.0 if kill is not None and kill.units == 0 else None
    first_unit, sent, sent_at, reached_job, at_units = None, False, 0.0, True, 0
    start = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(command, cwd=REPO, env={**os.environ, **ENV,
                                                       "PYTHON": sys.executable},
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            while proc.poll() is None:
                now = time.perf_counter() - start
                done = job.progress(output) - start_units
                if first_unit is None and done > 0:
                    first_unit = now
                if kill is not None and not sent and reached_at is None and done >= kill.units:
                    reached_at = now
                if not sent and reached_at is not None and now >= reached_at + kill.delay:
                    reached_job, at_units = _is_job(proc.pid), job.progress(output)
                    send_notice(proc, kind)
                    sent, sent_at = True, now
                    if kind == "double":
                        try:
                            proc.wait(timeout=float(rng.uniform(0.2, 1.5)))
                        except subprocess.TimeoutExpired:
                            send_notice(proc, kind)
                    continue
                limit = STOP_TIMEOUT_SECONDS if sent else RUN_TIMEOUT_SECONDS
                if now - (sent_at if sent else 0.0) > limit:
                    raise RuntimeError(f"{' '.join(command)} ran over {limit} s "
                                       f"(log: {log_path})")
                time.sleep(POLL_SECONDS)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return (Attempt(proc.returncode, time.perf_counter() - start, sent, first_unit, log_path,
                    job.partial(output) if sent else 0), sent, reached_job, at_units)


@dataclasses.dataclass
class SignalResult:
    job: str
    notices: dict = dataclasses.field(default_factory=dict)       # kind -> count sent
    runs: int = 0                                                 # processes started
    exit_codes: dict = dataclasses.field(default_factory=dict)   # code -> runs
    requeues: int = 0                                             # exits 75, rerun
    redone: int = 0                                               # steps/epochs/shards redone
    outputs_compared: int = 0
    equal: bool = True                                            # every compared output
    bad_exits: int = 0                                            # exit codes other than 0, 75
    seconds: float = 0.0
    reference_seconds: float = 0.0
    total_units: int = 0
    notice_log: list = dataclasses.field(default_factory=list)
    problems: list = dataclasses.field(default_factory=list)


def exercise_signals(job: Job, root: str, notices: int, max_per_run: int, rng,
                     kind_offset: int = 0) -> SignalResult:
    """The uninterrupted reference run (through run_job.sh), then outputs made by runs that get
    SIGTERM notices at random points (single, double, process-group in turn) and are requeued
    while they exit 75, as a managed job is; a run that exits 0 is finished; any other exit code
    is a failure. Each completed output is compared with the reference's."""
    result = SignalResult(job.name)
    codes = collections.Counter()
    start = time.perf_counter()
    ref_out = os.path.join(root, f"{job.name}_sig_reference")
    reference, _, _, _ = run_signalled_attempt(job, ref_out, None, "single", ref_out + ".log", rng)
    if reference.returncode != 0:
        raise RuntimeError(f"{job.name}: the uninterrupted run exited {reference.returncode}:\n"
                           f"{reference.log_tail()}")
    result.reference_seconds = reference.seconds
    expected = job.contents(ref_out)
    total = result.total_units = job.progress(ref_out)
    sent_total, run = 0, 0
    while sent_total < notices:
        out = os.path.join(root, f"{job.name}_sig_run{run}")
        budget = min(max_per_run, notices - sent_total)
        i = 0
        while True:
            kill, kind = None, SIGNALS[(kind_offset + sent_total) % len(SIGNALS)]
            if i < budget and job.progress(out) < total:
                kill = pick_notice(rng, job.progress(out), total, reference)
            done, before = job.progress(out), shard_files(out)
            attempt, sent, reached, at_units = run_signalled_attempt(
                job, out, kill, kind, f"{out}.attempt{i}.log", rng)
            result.runs += 1
            codes[attempt.returncode] += 1
            after = shard_files(out)
            rewritten = sum(name in after and after[name] != key for name, key in before.items())
            result.redone += rewritten
            if sent:
                sent_total += 1
                result.notices[kind] = result.notices.get(kind, 0) + 1
                notice = Notice(kind, done, kill.units, round(kill.delay, 3), attempt.returncode,
                                reached, rewritten, at_units)
                result.notice_log.append(notice)
            i += 1
            if attempt.returncode == EXIT_RESUME:
                result.requeues += 1
                redo = redone_after_stop(job, out)
                result.redone += redo
                if sent:
                    notice.redone += redo
                if i > budget + 5:
                    result.problems.append(f"run {run}: still exiting 75 after {i} attempts")
                    break
                continue
            if attempt.returncode != 0:
                # Not requeued by a launcher; the study reruns it by hand and goes on.
                result.bad_exits += 1
                result.problems.append(f"run {run} attempt {i - 1} exited {attempt.returncode}"
                                       f"{_where(attempt, sent, reached)}")
                if i <= budget + 5:
                    continue
            break
        result.outputs_compared += 1
        differ = job.compare(out, expected)
        result.equal &= not differ
        result.problems += [f"run {run}: {p}" for p in differ]
        run += 1
    result.exit_codes = {str(k): v for k, v in sorted(codes.items())}
    result.seconds = time.perf_counter() - start
    return result


def _where(attempt: Attempt, sent: bool, reached: bool) -> str:
    if not sent:
        return f" without a notice:\n{attempt.log_tail()}"
    if not reached:
        return " (the notice reached run_job.sh before it exec'd the job: bash died of it)"
    with open(attempt.log_path, encoding="utf-8", errors="replace") as f:
        logged = any(re.search(r"\.py:\d+\] ", line) for line in f)   # an absl line of the job
    if not logged:
        return (" (nothing logged yet: the notice landed while Python imported the job's "
                "modules, before its SIGTERM handler was installed)")
    return f":\n{attempt.log_tail()}"


UNIT_NAMES = {"generate": "shards", "import_images": "shards", "train": "steps",
              "linear_probe": "epochs"}


def print_signal_table(results: list[SignalResult], seed: int, seconds: float) -> None:
    print(f"fault injection (SIGTERM through launch/run_job.sh): seed {seed}, "
          f"{sum(sum(r.notices.values()) for r in results)} notices in all, "
          f"{seconds / 60:.1f} min")
    print("| job | notices (single/double/group) | runs | exit codes (runs) | requeues | "
          "redone | completed outputs compared | outputs equal | wall time (of which the "
          "uninterrupted run) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        kinds = "/".join(str(r.notices.get(k, 0)) for k in SIGNALS)
        codes = ", ".join(f"{c}: {n}" for c, n in r.exit_codes.items())
        print(f"| {r.job} | {kinds} | {r.runs} | {codes} | {r.requeues} | {r.redone} "
              f"{UNIT_NAMES[r.job]} | {r.outputs_compared} | {'yes' if r.equal else 'no'} | "
              f"{r.seconds:.0f} s ({r.reference_seconds:.0f} s) |")
    for r in results:
        if r.notice_log:
            sent = [(n.kind, f"{n.at_units}/{r.total_units}", n.exit_code) for n in r.notice_log]
            print(f"{r.job} notices (kind, units done when sent / of {UNIT_NAMES[r.job]} in all, "
                  f"exit code): {sent}")
        for problem in r.problems:
            print(f"{r.job}: {problem}")


def split_kills(total: int, jobs: list[str]) -> dict:
    base, extra = divmod(total, len(jobs))
    return {job: base + (i < extra) for i, job in enumerate(jobs)}


def print_table(results: list[JobResult], seed: int, seconds: float) -> None:
    print(f"fault injection: seed {seed}, {sum(r.kills for r in results)} SIGKILLs in all, "
          f"{seconds / 60:.1f} min")
    print("| job | kills | kills that left a half-written file | resumes | completed runs "
          "compared | outputs equal | wall time (of which the uninterrupted run) |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r.job} | {r.kills} | {r.kills_leaving_partial_files} | {r.resumes} | "
              f"{r.runs_compared} | {'yes' if r.equal else 'no'} | {r.seconds:.0f} s "
              f"({r.reference_seconds:.0f} s) |")
    for r in results:
        if r.kill_points:
            print(f"{r.job} kill points (units done at start, further units, delay s): "
                  f"{r.kill_points}")
        for problem in r.problems:
            print(f"{r.job}: {problem}")


def main(argv=None) -> int:
    args = _args(argv)
    root = args.workdir or tempfile.mkdtemp(prefix="fault_injection_")
    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    kills = split_kills(args.kills, args.jobs)
    jobs = {}
    if "generate" in args.jobs:
        from tiny_sd import write_tiny_sd
        model = write_tiny_sd(os.path.join(root, "tiny_sd"))
        jobs["generate"] = generate_job(
            model, write_captions(os.path.join(root, "captions.txt"), args.gen_captions))
    if "import_images" in args.jobs or "train" in args.jobs:
        csv_path, roots = write_import_layout(os.path.join(root, "import_input"),
                                              args.import_captions, args.seed)
        jobs["import_images"] = import_job(csv_path, roots)
    # train reads the uninterrupted import output (made here when import is not under test).
    imported = os.path.join(root, "import_images_reference")
    jobs["train"] = train_job(os.path.join(imported, "*" + SHARD_SUFFIX), args.train_steps)

    if "linear_probe" in args.jobs:
        import probe_fixtures
        jobs["linear_probe"] = probe_job(
            probe_fixtures.save_tiny_encoder(os.path.join(root, "encoder")),
            probe_fixtures.write_tinted_folder(os.path.join(root, "tinted"), 8, 8),
            args.probe_epochs)

    results = []
    started = time.perf_counter()
    if args.signals:
        notices = split_kills(args.signals, args.jobs)
        for offset, name in enumerate(n for n in JOBS if n in args.jobs):
            if name == "train" and shard_progress(imported) == 0:
                made = run_attempt(jobs["import_images"], imported, None, imported + ".log")
                if made.returncode != 0:
                    raise RuntimeError(f"import_images exited {made.returncode}:\n"
                                       f"{made.log_tail()}")
            results.append(exercise_signals(jobs[name], root, notices[name],
                                            args.max_kills_per_run, rng, offset))
        print_signal_table(results, args.seed, time.perf_counter() - started)
    for name in JOBS if not args.signals else ():
        if name not in args.jobs:
            continue
        if name == "train" and shard_progress(imported) == 0:
            made = run_attempt(jobs["import_images"], imported, None, imported + ".log")
            if made.returncode != 0:
                raise RuntimeError(f"import_images exited {made.returncode}:\n{made.log_tail()}")
        results.append(exercise(jobs[name], root, kills[name], args.max_kills_per_run, rng))
    if not args.signals:
        print_table(results, args.seed, time.perf_counter() - started)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"seed": args.seed, "args": vars(args),
                       "results": [dataclasses.asdict(r) for r in results]}, f, indent=2)
    if not args.workdir:
        shutil.rmtree(root, ignore_errors=True)
    return 0 if all(r.equal and not getattr(r, "bad_exits", 0) for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
