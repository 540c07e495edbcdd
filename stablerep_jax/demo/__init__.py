r"""The demo: StableRep's comparison in miniature on a laptop CPU, on a toy text-to-image world.

  python -m stablerep_jax.demo --workdir=/tmp/stablerep_demo [--config.generator=sd --config.model=SD]
  python -m stablerep_jax.demo --workdir=DIR --config.train.model.depth=6 --config.probe.epochs=50

  comparison.py  the job: data -> train StableRep and SimCLR -> linear probes -> report
  toy_world.py   the toy renderer standing in for photos and for Stable Diffusion
  report.py      the report's figures and tables

It sits on top of the jobs it runs (generate, train, linear_probe): no other module of the
package imports it (tests/test_layers.py).
"""
