"""Simulated vLLM engine ("mocker"): real scheduling and KV-cache accounting, modelled compute time."""

from zdyn.engines.mocker.config import MockerConfig
from zdyn.engines.mocker.engine import MockerEngine
from zdyn.engines.mocker.kv_manager import KvBlockManager, hash_block
from zdyn.engines.mocker.scheduler import Scheduler
from zdyn.engines.mocker.sequence import MockSequence, new_sequence, sample_token
from zdyn.engines.mocker.timing import InterpolatedTiming, PolynomialTiming, StepComposition, TimingModel

__all__ = [
    "InterpolatedTiming",
    "KvBlockManager",
    "MockSequence",
    "MockerConfig",
    "MockerEngine",
    "PolynomialTiming",
    "Scheduler",
    "StepComposition",
    "TimingModel",
    "hash_block",
    "new_sequence",
    "sample_token",
]
