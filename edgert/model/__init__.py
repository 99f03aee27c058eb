"""What a model is: its config, the loaders of its sources (GGUF, HF directory), the
architecture registry, and the Medusa head module trained on it."""
