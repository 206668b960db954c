"""Load: a fixed pool under continuous batching (throughput), the OpenAI server under open-loop
load, and hostile requests."""
