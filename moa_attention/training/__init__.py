"""The offline trainer: config.py and cli.py (the command line), records.py (what any dataset layout
yields), dataset.py (manifest, layout detection and the validator), fastcomposer.py (FastComposer's
layout), encode.py (frozen encoders, cached), step.py (one forward with losses), capture.py
(the layers' observer for the losses), losses.py, loop.py (the loop), estimate.py
(--estimate), checkpoints.py and sampling.py. Nothing outside this package imports it."""
