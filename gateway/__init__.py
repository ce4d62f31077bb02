"""A Trio LLM gateway for a LAN: one Ollama GPU host and a few cloud providers behind one
well-behaved endpoint."""

__version__ = "0.1.0"
