"""`python -m moa_attention.evaluate FOLDER`: evaluation numbers for a folder of generated pictures
(evaluation/cli.py does the work)."""
import sys

from .evaluation.cli import main

if __name__ == "__main__":
    sys.exit(main())
