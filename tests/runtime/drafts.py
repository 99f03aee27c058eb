"""Prompts and the export helper of the draft-layer tests (fixtures: ``conftest.py``)."""

from __future__ import annotations

from edgert.export.exporter import ExportOptions, export_model

PROMPTS = ["Write a haiku about the sea", "Explain loops in Python", "What is a function?",
           "Tell me about classes"]
TRAIN_PROMPTS = ["Explain loops.", "What is a class?", "Write a poem about rain.",
                 "Sum 2 and 3.", "Describe a cat.", "Why is the sky blue?",
                 "Name three colours.", "Count to five.", "Tell me a story.", "What is rain?"]


def export(tiny_dir, out, draft, **options):
    """The tiny model with the draft in ``draft`` (a directory), 512 tokens, depth 4."""
    return export_model(str(tiny_dir), out, ExportOptions(draft=draft, max_context=512,
                                                          draft_depth=4, **options),
                        log=lambda m: None)
