"""One host of a two-host `import_images` or `convert` job, run through the real command line,
for tests/test_import_images.py and tests/test_convert.py.

  python tests/multiprocess_writers.py PROCESS_ID NUM_PROCESSES PORT JOB CONFIG \
      [--config.k=v ...] [@I:--config.k=v ...]

The job finds its peers as on a SLURM cluster: the SLURM variables of this process and
JAX_COORDINATOR_PORT (a loopback coordinator) are set, so the job's own main must join
jax.distributed (JAX's cluster detection) and take its process index from JAX. The last
process starts 5 s late: process 0 would finish its own part first, and only a barrier keeps it
from writing outputs that miss the other process's part. Prints the job's output and
"exit code N", and exits 0, so a test can check refusals too.
"""
import os
import subprocess
import sys
import time

process_id, num_processes, port = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
job, config = sys.argv[4], sys.argv[5]
# "@I:--config.k=v" applies to process I only (a host that lacks a file, for instance).
overrides = [arg.split(":", 1)[1] if arg.startswith("@") else arg for arg in sys.argv[6:]
             if not arg.startswith("@") or arg[1:].split(":", 1)[0] == str(process_id)]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

env = dict(os.environ, JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2",
           XLA_FLAGS="--xla_force_host_platform_device_count=1", PYTHONPATH=REPO,
           JAX_COORDINATOR_PORT=port, SLURM_JOB_ID="4242", SLURM_STEP_NODELIST="localhost",
           SLURM_NTASKS=str(num_processes), SLURM_PROCID=str(process_id), SLURM_LOCALID="0")
if process_id == num_processes - 1:
    time.sleep(5)
result = subprocess.run([sys.executable, "-m", f"stablerep_jax.{job}",
                         f"--config={os.path.join(REPO, 'configs', config)}", *overrides],
                        env=env, cwd=REPO, capture_output=True, text=True, timeout=500)
print(result.stdout + result.stderr)
print(f"exit code {result.returncode}", flush=True)
