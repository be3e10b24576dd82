"""Toy world: proves the trainer learns MoA's subject-context disentanglement on identities it
never saw. `python -m experiments.toy_world.run --out runs/toy`; results in README.md."""
