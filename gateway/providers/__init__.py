"""Chat providers: the local Ollama target and cloud services, chosen by model name."""
