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


def assert_lossless(engine, mode: str, prompts=PROMPTS, max_new_tokens: int = 40) -> None:
    """Speculative ``mode`` gives plain greedy's tokens on every prompt."""
    for prompt in prompts:
        plain = engine.generate(prompt, max_new_tokens=max_new_tokens, speculative="off")
        spec = engine.generate(prompt, max_new_tokens=max_new_tokens, speculative=mode)
        assert spec.output_ids == plain.output_ids, prompt
        assert spec.stats["speculative"] == mode
