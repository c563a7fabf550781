"""The generation engine: continuous batching of requests for any adapters over one compiled
model (see :mod:`hotswap_rt.engine.engine`).

::

    engine = GenerationEngine(rt, tokenizer, EngineConfig(max_seqs=32))
    engine.start()
    handle = engine.submit(prompt_ids, adapter="sql", sampling=SamplingParams(max_tokens=64))
    for event in handle: ...          # TokenEvent ..., then one FinishEvent
    handle.cancel()
"""

from .config import EngineConfig
from .engine import GenerationEngine
from .sampling import RequestError, SamplingParams
from .sequence import Event, FinishEvent, RequestHandle, TokenEvent
from .structured import StructuredOutput

__all__ = ["EngineConfig", "Event", "FinishEvent", "GenerationEngine", "RequestError",
           "RequestHandle", "SamplingParams", "StructuredOutput", "TokenEvent"]
