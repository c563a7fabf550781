"""An OpenAI-compatible HTTP server over a :class:`~hotswap_rt.HotswapRuntime` (serve extra).

``hotswap-rt serve`` runs it; :func:`build_app` gives the FastAPI app to embed or to run with
any ASGI server. Requests for any adapters are generated together by one
:class:`~hotswap_rt.engine.GenerationEngine` (continuous batching, an adapter per row).

Modules: :mod:`.protocol` (bodies, errors, the backend interface), :mod:`.app` (routes),
:mod:`.backend` (the engine behind them), :mod:`.model` and :mod:`.default_model` (what is
served), :mod:`.tokenizers`, :mod:`.metrics`, :mod:`.config`, :mod:`.cli`, :mod:`.ray` (Ray Serve).
"""

from .config import ServeConfig
from .model import Served, build_runtime, serve_model

__all__ = ["ServeConfig", "Served", "build_app", "build_runtime", "serve_model"]


def __getattr__(name: str):
    if name == "build_app":  # imports fastapi: only when asked for
        from .app import build_app

        return build_app
    raise AttributeError(name)
