"""Load generator for OpenAI-compatible endpoints (``zdyn bench``), with vLLM ``bench serve`` metrics."""
