"""Toy world: proves the trainer learns MoA's subject-context disentanglement on identities it
never saw (issue #10). `python -m experiments.toy_world.run --out runs/toy`."""
