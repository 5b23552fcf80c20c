"""Hard-negative mining: training pairs in, the same rows with mined `negatives` out (`jobs/mine_negatives.py`)."""
