"""An OpenAI-compatible HTTP server over a :class:`~hotswap_rt.HotswapRuntime` (serve extra).

``hotswap-rt serve`` runs it; :func:`build_app` gives the FastAPI app to embed or to run with
any ASGI server. One inference thread owns the compiled model (:mod:`.engine`); requests for
different adapters share batches, one adapter per row (:mod:`.generation`).
"""

from .config import ServeConfig, build_runtime

__all__ = ["ServeConfig", "build_app", "build_runtime"]


def __getattr__(name: str):
    if name == "build_app":  # imports fastapi: only when asked for
        from .app import build_app

        return build_app
    raise AttributeError(name)
