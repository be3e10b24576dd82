"""Experiments that exercise the trainer end to end (not part of the node pack)."""
