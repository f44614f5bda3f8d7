"""zdyn: broker-less disaggregated LLM serving on ZeroMQ."""

__version__ = "0.1.0"
