"""``edgert serve``: an OpenAI-compatible HTTP server over an Engine (needs ``edgert[serve]``)."""
