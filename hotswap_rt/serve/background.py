"""Run an app with uvicorn on a free loopback port in a background thread (tests, benchmarks,
notebooks): ``with BackgroundServer(build_app(config)) as url: ...``."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any


class BackgroundServer:
    """Starts on ``__enter__`` (waits until the app's start-up, compile included, is done) and
    stops on ``__exit__``. ``url`` is ``http://127.0.0.1:<port>``."""

    def __init__(self, app: Any, host: str = "127.0.0.1", start_timeout: float = 600.0) -> None:
        import uvicorn

        with socket.socket() as probe:
            probe.bind((host, 0))
            port = probe.getsockname()[1]
        self.url = f"http://{host}:{port}"
        self._server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
        self._thread = threading.Thread(target=self._server.run, name="uvicorn", daemon=True)
        self._start_timeout = start_timeout

    def __enter__(self) -> str:
        self._thread.start()
        deadline = time.monotonic() + self._start_timeout
        while not self._server.started:
            if not self._thread.is_alive():
                raise RuntimeError("the server exited during start-up (see its log)")
            if time.monotonic() > deadline:
                raise TimeoutError("the server did not start in time")
            time.sleep(0.05)
        return self.url

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=60)
