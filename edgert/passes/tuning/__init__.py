"""Per-target kernel tuning: the database, the kernels' search spaces, the measuring loop."""
