"""HTTP/1.1 on trio streams: the server side and the Ollama target client."""
