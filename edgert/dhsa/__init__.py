"""DHSA: dynamic hierarchical sparse attention for long prefill (arXiv 2510.24606)."""
