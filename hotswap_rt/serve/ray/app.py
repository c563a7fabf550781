"""Scale-out on Ray Serve: many replicas, each one runtime, requests routed by adapter.

Three deployments (extra ``ray``):

- ``Ingress``: the same FastAPI routes as the single-process server, over :class:`RayBackend`.
  Each request goes to the worker deployment with ``multiplexed_model_id`` = its adapter (none
  for the base model; for a mix, ``"adapters"``, its heaviest adapter), so Ray routes it to a
  replica that already holds that adapter; every response names the replica in an
  ``x-hotswap-replica`` header.
- ``HotswapWorker``: one :class:`~hotswap_rt.serve.backend.LocalBackend` (runtime + generation
  engine) per replica (:mod:`.worker`). Its ``@serve.multiplexed`` loader
  loads the adapter if needed and returns a lease on its slot; when Ray evicts it (LRU,
  ``max_num_models_per_replica = device_slots``) the lease is released (idempotent,
  thread-safe) once the requests using it have ended.
- ``AdapterDirectory``: the one list of adapters (name -> path, version) every replica resolves
  names through, so runtime load/unload reaches every replica; replicas also report their stats
  to it (``/stats``, ``/metrics``).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, AsyncIterator

from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle

from ..config import ServeConfig
from ..metrics import RequestMetrics
from ..model import model_max_len
from ..protocol import (
    ApiError, ChatCompletionRequest, DetokenizeRequest, GenerationRequest, TokenizeChatRequest, TokenizeRequest)
from .worker import AdapterDirectory, worker_deployment

log = logging.getLogger(__name__)


class RayBackend:
    """The :class:`~hotswap_rt.serve.protocol.Backend` over the worker and directory deployments."""

    def __init__(self, model_name: str, max_model_len: int, worker: DeploymentHandle,
                 directory: DeploymentHandle) -> None:
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.worker = worker
        self.directory = directory
        self.created = int(time.time())
        self.replica_stats: dict[str, dict] = {}
        self.listing: dict[str, dict] = {}
        self._listed_at = float("-inf")

    async def _listing(self, refresh: bool = False) -> dict[str, dict]:
        """The directory's adapters, cached for ``LISTING_TTL_S``; ``refresh`` forces a call."""
        if refresh or time.monotonic() - self._listed_at > self.LISTING_TTL_S:
            self.listing = await self.directory.list.remote()
            self._listed_at = time.monotonic()
        return self.listing

    LISTING_TTL_S = 0.5

    async def knows(self, model: str) -> bool:
        if model == self.model_name or model in await self._listing():
            return True
        return model in await self._listing(refresh=True)  # added through another ingress

    async def adapter_cards(self) -> list[dict[str, str]]:
        listed = await self._listing(refresh=True)
        return [{"id": name, "root": entry["path"]} for name, entry in listed.items()]

    async def load_adapter(self, name: str, path: str) -> None:
        problem = await self.worker.check_adapter.remote(path)
        if problem is not None:
            raise ApiError(400, problem, "lora_path")
        if not await self.directory.add.remote(name, path):
            raise ApiError(400, f"The lora adapter '{name}' has already been loaded.", "lora_name")
        await self._listing(refresh=True)

    async def unload_adapter(self, name: str) -> None:
        if not await self.directory.remove.remote(name):
            raise ApiError(404, f"The lora adapter '{name}' cannot be found.", "lora_name")
        await self._listing(refresh=True)

    async def stats(self) -> dict:
        """What every replica last reported (also refreshes what ``/metrics`` shows)."""
        self.replica_stats = await self.directory.all_stats.remote()
        return {"replicas": self.replica_stats}

    refresh_stats = stats

    async def tokenize(self, body: TokenizeRequest) -> dict[str, Any]:
        """Any replica's tokenizer (they all serve the same model)."""
        chat = isinstance(body, TokenizeChatRequest)
        return _answer(await self.worker.tokenize.remote(body.model_dump(), chat))

    async def detokenize(self, body: DetokenizeRequest) -> dict[str, Any]:
        return _answer(await self.worker.detokenize.remote(body.model_dump()))

    async def generate(self, body: GenerationRequest) -> AsyncIterator[tuple[str, Any]]:
        """Events from a worker replica. A replica that dies before its first token is retried on
        another (up to ``RETRIES`` times); after a token has gone out, the failure is a 500."""
        if body.adapters is not None:
            adapter = await self._route_of_mix(body)
        else:
            adapter = "" if body.model == self.model_name else body.model
            if adapter and not await self.knows(adapter):
                raise ApiError(404, f"The model `{body.model}` does not exist.", "model")
        handle = self.worker.options(stream=True, multiplexed_model_id=adapter)
        payload, chat = body.model_dump(), isinstance(body, ChatCompletionRequest)
        for attempt in range(self.RETRIES + 1):
            response = handle.generate.remote(payload, chat)
            started, held = False, {}
            try:
                async for kind, value in response:
                    if kind == "error":
                        raise ApiError(value["status"], value["message"], value["param"])
                    if kind in ("replica", "prompt"):  # held back until the replica produced something
                        held[kind] = value
                        continue
                    if not started:
                        started = True
                        yield "replica", held.get("replica")
                        if "prompt" in held:
                            yield "prompt", held["prompt"]
                    yield kind, value
                return
            except (RayActorError, ReplicaUnavailableError) as exc:
                if started or attempt == self.RETRIES:
                    raise ApiError(500, f"the replica serving this request failed: {exc}") from exc
                log.warning("replica died before the first token; retrying (%s)", exc)
            finally:
                response.cancel()  # a client that left stops its row on the replica
    RETRIES = 2

    async def _route_of_mix(self, body: GenerationRequest) -> str:
        """The adapter a mix (``adapters``) is routed by: its heaviest adapter (the largest
        weight, then the first name), so it goes to a replica that already holds that one; the
        replica leases the others too. "" (the base model) when every weight is 0. Checks what
        the single-process server checks first: ``model`` is the base model, every name is
        known (404)."""
        assert body.adapters is not None
        if body.model != self.model_name:
            raise ApiError(400, f"with `adapters`, `model` must be the base model "
                                f"`{self.model_name}`", "model")
        for name in body.adapters:
            if name == self.model_name or not await self.knows(name):
                raise ApiError(404, f"The adapter `{name}` does not exist.", "adapters")
        weighted = sorted((-abs(weight), name) for name, weight in body.adapters.items() if weight != 0.0)
        return weighted[0][1] if weighted else ""


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1024)
@serve.ingress()
class Ingress:
    """The HTTP front: :func:`~.app.create_app` over :class:`RayBackend`."""

    def __init__(self, config: ServeConfig, model_name: str, worker: DeploymentHandle,
                 directory: DeploymentHandle) -> None:
        self.config = config
        self.backend = RayBackend(model_name, model_max_len(config), worker, directory)

    def __serve_build_asgi_app__(self):
        from ..app import create_app
        from ..metrics import ReplicaStatsCollector

        metrics = RequestMetrics([ReplicaStatsCollector(self.backend)])
        return create_app(self.backend, self.config, metrics)


def build_ray_app(config: ServeConfig, replicas: int = 2, worker_cpus: float = 1.0,
                  worker_gpus: float = 0.0) -> serve.Application:
    """The Ray Serve application: ``serve.run(build_ray_app(config, replicas=4))``."""
    from ..default_model import MODEL_NAME
    from ..demo_adapters import demo_adapter_paths

    adapters = dict(config.adapters)
    if config.model is None:
        adapters = {**{n: str(p) for n, p in demo_adapter_paths().items()}, **adapters}
    directory = AdapterDirectory.bind(adapters)
    threads = max(1, int(worker_cpus)) if worker_cpus else os.cpu_count() or 1
    worker = worker_deployment(config, replicas, worker_cpus, worker_gpus).bind(config, directory, threads)
    return Ingress.bind(config, config.model or MODEL_NAME, worker, directory)


def app_builder(args: dict[str, Any]) -> serve.Application:
    """For ``serve run hotswap_rt.serve.ray.app:app_builder key=value ...`` and ``serve deploy``
    config files: ``args`` are :class:`ServeConfig` fields plus ``replicas``, ``worker_cpus``,
    ``worker_gpus``."""
    args = dict(args)
    replicas = int(args.pop("replicas", 2))
    cpus = float(args.pop("worker_cpus", 1.0))
    gpus = float(args.pop("worker_gpus", 0.0))
    return build_ray_app(ServeConfig(**args), replicas=replicas, worker_cpus=cpus, worker_gpus=gpus)


def _answer(reply: dict) -> dict[str, Any]:
    """A replica's ``{"ok": answer}`` or ``{"error": ...}`` (raised as the ``ApiError``)."""
    if "error" in reply:
        error = reply["error"]
        raise ApiError(error["status"], error["message"], error["param"])
    return reply["ok"]
