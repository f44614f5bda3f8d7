"""zdyn's benchmarks: each module answers one question (``python -m benchmarks.NAME``); see README.md. What they
share (deployments, the lock, CPU sampling, reporting) is the harness in ``zdyn.bench``."""
