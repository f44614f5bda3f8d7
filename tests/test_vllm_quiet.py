"""vLLM's harmless CPU messages are dropped, and nothing else is."""

import logging

from zdyn.engines.vllm.quiet import HARMLESS, quiet_harmless_messages


def test_only_the_known_harmless_messages_are_dropped(caplog):
    quiet_harmless_messages()
    quiet_harmless_messages()  # idempotent: one filter per logger
    name = "vllm.triton_utils.importing"
    assert len(logging.getLogger(name).filters) == 1
    with caplog.at_level(logging.INFO):
        logging.getLogger(name).warning("Triton is installed, but doesn't include CPU backend. Disabling Triton.")
        logging.getLogger(name).info("Triton is installed but %d active driver(s) found (expected 1).", 0)
        logging.getLogger("vllm.platforms.cpu").warning("Triton is not installed. triton-cpu is expected on x86 CPUs.")
        logging.getLogger(name).warning("Triton is installed, but `triton.backends` could not be imported.")
        logging.getLogger("vllm.other").warning("Triton is not installed. triton-cpu is expected on x86 CPUs.")
    assert [r.name for r in caplog.records] == [name, "vllm.other"]
    assert set(HARMLESS) == {name, "vllm.platforms.cpu"}
