"""vLLM's messages on a CPU host that report nothing wrong, kept out of zdyn's logs.

vLLM's CPU wheel still installs Triton (xgrammar depends on it), a compiler for GPUs: each vLLM process logs
"Triton is installed, but doesn't include CPU backend. Disabling Triton." and "Triton is not installed.
triton-cpu is expected on x86 CPUs.", and when it exits Triton's nanobind bindings print a report of objects
"leaked" at interpreter shutdown (Python frees nothing at exit; nothing leaks while serving). The two lines are
filtered here, in the processes that import zdyn's vLLM package; the exit report comes from C++ after Python has
stopped, so it cannot be: ``run.sh`` leaves it out of a dead role's log tail, and the README explains it.
"""

from __future__ import annotations

import logging

HARMLESS = {  # vLLM's logger -> the start of each message that says nothing is wrong on a CPU host
    "vllm.triton_utils.importing": ("Triton is installed, but doesn't include CPU backend",),
    "vllm.platforms.cpu": ("Triton is not installed. triton-cpu is expected",),
}


class _DropHarmless(logging.Filter):
    def __init__(self, starts: tuple[str, ...]) -> None:
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.starts)


def quiet_harmless_messages() -> None:
    """Install the filters (idempotent); call before vLLM is imported, which logs the first of them."""
    for name, starts in HARMLESS.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropHarmless) for f in logger.filters):
            logger.addFilter(_DropHarmless(starts))
