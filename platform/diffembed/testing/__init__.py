"""Test utilities that later CPU smoke configs reuse (tiny checkpoints in real layouts)."""
