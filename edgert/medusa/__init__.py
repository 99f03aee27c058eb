"""Medusa decoding heads (arXiv 2401.10774): model, Medusa-1 training, evaluation, export."""
