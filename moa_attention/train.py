"""`python -m moa_attention.train`: the trainer's command line (training/cli.py does the work)."""
import sys

from .training.cli import main

if __name__ == "__main__":
    sys.exit(main())
