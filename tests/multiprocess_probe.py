"""One process of a multi-process linear probe and k-NN job on CPU, for tests/test_linear_probe.py.

  python tests/multiprocess_probe.py PROCESS_ID NUM_PROCESSES PORT ENCODER_DIR FOLDER WORKDIR MODES

The 8 CPU devices are split evenly over the processes. Each process gets its own workdir
(WORKDIR/<mode>/p<PROCESS_ID>) so the test can see which process wrote what: on a pod they share
one, and only process 0 may write. The probe's orbax checkpoints, which every process saves
together, go to one shared WORKDIR/<mode>/shared. Prints `RESULTS <mode> <json>` per mode (comma-separated).
"""
import json
import os
import sys

process_id, num_processes, port = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
encoder_dir, folder, workdir, modes = sys.argv[4], sys.argv[5], sys.argv[6], sys.argv[7]
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={8 // num_processes}"
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["CUDA_VISIBLE_DEVICES"] = ""

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import probe_fixtures as F  # noqa: E402
from stablerep_jax import knn, linear_probe, parallel  # noqa: E402


def main():
    if num_processes > 1:
        parallel.initialize_distributed(f"localhost:{port}", num_processes, process_id)
    for mode in modes.split(","):
        config = F.probe_config(encoder_dir, folder, mode=mode, epochs=4, eval_every=2)
        out = os.path.join(workdir, mode, f"p{process_id}")
        # The probe's resume checkpoints: one directory for all processes, as on a pod.
        results = linear_probe.run(config, out, checkpoint_workdir=os.path.join(
            workdir, mode, "shared"))
        results.update(knn.run(config, out))
        results.pop("seconds")
        print("RESULTS", mode, json.dumps(results, sort_keys=True), flush=True)


if __name__ == "__main__":
    main()
