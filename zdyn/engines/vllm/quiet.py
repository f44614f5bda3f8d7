"""vLLM's messages on a CPU host that report nothing wrong, kept out of zdyn's logs where zdyn can.

vLLM's CPU wheel still installs Triton (xgrammar depends on it), a compiler for GPUs: a vLLM process logs "Triton
is installed, but doesn't include CPU backend. Disabling Triton." (or "... 0 active driver(s) found ...") and
"Triton is not installed. triton-cpu is expected on x86 CPUs.", and when it exits Triton's nanobind bindings print
a report of objects "leaked" at interpreter shutdown (Python frees nothing at exit; nothing leaks while serving).
The messages are filtered here, in the processes that import zdyn's vLLM package (a worker's main process, a
frontend or processor with output parsers). vLLM's own engine processes start fresh interpreters that import
Triton before any zdyn code runs, so each of them still prints the first line once; the exit report comes from C++
after Python has stopped. ``run.sh`` leaves the report out of a dead role's log tail, and the README explains both.
"""

from __future__ import annotations

import logging

HARMLESS = {  # vLLM's logger -> the start of each message that says nothing is wrong on a CPU host
    "vllm.triton_utils.importing": (
        "Triton is installed, but doesn't include CPU backend",
        "Triton is installed but %d active driver(s) found",
    ),
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
