"""Training-file reading and validation. Pure Python + Pillow: no torch, no storage."""
