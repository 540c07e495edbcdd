"""One process of a multi-process `generate` run on CPU, for tests/test_generate.py.

  python tests/multiprocess_generate.py PROCESS_ID NUM_PROCESSES PORT MODEL CAPTIONS OUTPUT_DIR

The processes join through jax.distributed (loopback coordinator), as the hosts of a pod do;
process index and count come from JAX, not from the config, so the shard split, the barrier
before the manifest and host 0's manifest and contact sheet are the real multi-host path.
The last process starts 5 s late, so host 0 finishes its shards first and only the barrier
keeps it from writing a manifest that misses the other host's shard.
"""
import os
import sys
import time

process_id, num_processes, port = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
model, captions, output_dir = sys.argv[4], sys.argv[5], sys.argv[6]
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["CUDA_VISIBLE_DEVICES"] = ""

from stablerep_jax import generate  # noqa: E402  (imports diffusers before TensorFlow)
from stablerep_jax import config_utils, parallel  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    parallel.initialize_distributed(f"localhost:{port}", num_processes, process_id)
    config = config_utils.load_config(os.path.join(REPO, "configs", "generate.py") + ":tiny")
    config_utils.apply_overrides(config, {
        "model": model, "captions": captions, "output_dir": output_dir,
        "images_per_caption": 2, "captions_per_shard": 3})
    if process_id == num_processes - 1:
        time.sleep(5)
    summary = generate.run(config)
    print(f"process {process_id}: {summary['shards_written']} shards, "
          f"{summary['captions']} captions", flush=True)


if __name__ == "__main__":
    main()
