"""The local Ollama host: its client, wire models, NDJSON framing, inventory and warm-up."""
