"""`python -m stablerep_jax.demo --workdir=DIR [--config=configs/demo.py:PRESET] [--config.X=V]`."""
from absl import flags, logging

from stablerep_jax import cli
from stablerep_jax.demo import comparison


def main(config) -> int:
    """Exit code 0 when the demo ran to the end, `cli.EXIT_RESUME` when SIGTERM stopped it."""
    try:
        comparison.run(config, flags.FLAGS.workdir)
    except comparison.Preempted as e:
        logging.warning("%s", e)
        return cli.EXIT_RESUME
    return cli.EXIT_OK


if __name__ == "__main__":
    flags.DEFINE_string("workdir", "stablerep_demo", "where the demo writes everything")
    cli.run(main, default_config=comparison.config_file("demo.py"))
