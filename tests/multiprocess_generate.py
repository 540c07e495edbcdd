"""One host of a multi-process `generate` run on CPU, for tests/test_generate.py.

  python tests/multiprocess_generate.py PROCESS_ID NUM_PROCESSES PORT MODEL CAPTIONS OUTPUT_DIR

Runs the command line, `python -m stablerep_jax.generate`, with the multi-process flags every
job takes (`--coordinator_address=localhost:PORT --num_processes=N --process_id=I`), as each host
of a GPU cluster would: the job joins jax.distributed and takes its process index and count from
JAX, so the shard split, the barrier before the manifest and host 0's manifest and contact sheet
are the real multi-host path. The last process starts 5 s late, so host 0 finishes its shards
first and only the barrier keeps it from writing a manifest that misses the other host's shard.
This process becomes the job (exec): its exit code and output are the job's.
"""
import os
import sys
import time

process_id, num_processes, port = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
model, captions, output_dir = sys.argv[4], sys.argv[5], sys.argv[6]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

env = dict(os.environ, JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="", PYTHONPATH=REPO,
           XLA_FLAGS="--xla_force_host_platform_device_count=2")
argv = [sys.executable, "-m", "stablerep_jax.generate",
        f"--config={os.path.join(REPO, 'configs', 'generate.py')}:tiny",
        f"--config.model={model}", f"--config.captions={captions}",
        f"--config.output_dir={output_dir}", "--config.images_per_caption=2",
        "--config.captions_per_shard=3", f"--coordinator_address=localhost:{port}",
        f"--num_processes={num_processes}", f"--process_id={process_id}"]
if process_id == num_processes - 1:
    time.sleep(5)
os.chdir(REPO)
os.execve(sys.executable, argv, env)
