"""Scale-out on Ray Serve: many replicas, each one runtime, requests routed by adapter.

Three deployments (extra ``ray``):

- ``Ingress``: the same FastAPI routes as the single-process server, over :class:`RayBackend`.
  Each request goes to the worker deployment with ``multiplexed_model_id`` = its adapter (none
  for the base model), so Ray routes it to a replica that already holds that adapter; every
  response names the replica in an ``x-hotswap-replica`` header.
- ``HotswapWorker``: one :class:`~.backend.LocalBackend` (runtime + engine thread +
  mixed-adapter batcher) per replica. Its ``@serve.multiplexed`` loader loads the adapter if
  needed and returns an :class:`~hotswap_rt.AdapterLease`; when Ray evicts it (LRU,
  ``max_num_models_per_replica = device_slots``) the lease is released (idempotent,
  thread-safe) and the slot becomes reusable once no running batch reads it.
- ``AdapterDirectory``: the one list of adapters (name -> path, version) every replica resolves
  names through, so runtime load/unload reaches every replica; replicas also report their stats
  to it (``/stats``, ``/metrics``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any, AsyncIterator

from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle

from ..errors import HotswapError, SlotsBusyError
from .backend import ApiError, LocalBackend
from .config import ServeConfig, build_runtime
from .metrics import RequestMetrics
from .protocol import ChatCompletionRequest, CompletionRequest

log = logging.getLogger(__name__)

@serve.deployment(ray_actor_options={"num_cpus": 0})
class AdapterDirectory:
    """Adapter name -> ``{"path", "version"}``; replica id -> its last stats."""

    def __init__(self, adapters: dict[str, str]) -> None:
        self.adapters = {name: {"path": str(path), "version": 1} for name, path in adapters.items()}
        self.version = 1
        self.replicas: dict[str, dict] = {}

    def lookup(self, name: str) -> dict | None:
        return self.adapters.get(name)

    def list(self) -> dict[str, dict]:
        return dict(self.adapters)

    def add(self, name: str, path: str) -> bool:
        if name in self.adapters:
            return False
        self.version += 1
        self.adapters[name] = {"path": path, "version": self.version}
        return True

    def remove(self, name: str) -> bool:
        return self.adapters.pop(name, None) is not None

    def report(self, replica: str, stats: dict) -> None:
        self.replicas[replica] = {**stats, "reported_at": time.time()}

    def all_stats(self) -> dict[str, dict]:
        return dict(self.replicas)


class HotswapWorker:
    """One replica: a runtime and its engine (see the module doc). Made a deployment, with the
    multiplexed loader sized to ``device_slots``, by :func:`worker_deployment`."""

    def __init__(self, config: ServeConfig, directory: DeploymentHandle, threads: int) -> None:
        import torch

        torch.set_num_threads(max(1, threads))
        self.backend = LocalBackend(config, build_runtime(config))
        self.backend.start()  # compiles before the replica takes traffic
        self.directory = directory
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.versions: dict[str, int] = {name: 1 for name in self.backend.adapter_names()}
        self._report()

    async def _load_and_lease(self, name: str):
        entry = await self.directory.lookup.remote(name)
        if entry is None:
            raise ApiError(404, f"The model `{name}` does not exist.", "model")

        def load_and_lease(rt):
            if self.versions.get(name) != entry["version"]:
                rt.load(name, entry["path"], replace=name in self.versions)
                self.versions[name] = entry["version"]
            try:
                return rt.lease(name)
            except SlotsBusyError as exc:  # every slot leased: serve it unleased (a swap per batch)
                log.warning("no slot to lease for %r: %s", name, exc)
                return None

        return await asyncio.wrap_future(self.backend.engine.call(load_and_lease))

    async def _forget_unlisted(self, listed: dict[str, dict]) -> None:
        """Unload what the directory no longer lists (runtime unload reaches every replica)."""
        stale = [name for name in self.versions if name not in listed]

        def unload(rt):
            for name in stale:
                rt.unload(name, force=True)
                self.versions.pop(name, None)

        if stale:
            await asyncio.wrap_future(self.backend.engine.call(unload))

    async def generate(self, payload: dict, chat: bool) -> AsyncIterator[tuple[str, Any]]:
        """Events of one request (the first names this replica); errors travel as
        ``("error", {"status", "message", "param"})``."""
        yield "replica", self.replica
        try:
            body = (ChatCompletionRequest if chat else CompletionRequest).model_validate(payload)
            await self._forget_unlisted(await self.directory.list.remote())
            name = serve.get_multiplexed_model_id()
            if name:
                await self.get_lease(name)
            async for event in self.backend.generate(body):
                yield event
        except ApiError as exc:
            yield "error", exc.as_dict()
        except HotswapError as exc:  # the adapter could not be loaded or leased here
            yield "error", {"status": 400, "message": str(exc), "param": "model"}
        except Exception as exc:  # noqa: BLE001 - reported, the replica goes on
            yield "error", {"status": 500, "message": f"generation failed: {exc!r}", "param": None}
        finally:
            self._report()

    def check_adapter(self, path: str) -> str | None:
        """Validate ``path`` against this replica's runtime; the problem, or None."""
        try:
            self.backend.served.rt.check(path)
        except HotswapError as exc:
            return str(exc)
        return None

    def stats(self) -> dict:
        return {"replica": self.replica, **self.backend.stats()}

    def _report(self) -> None:
        self.directory.report.remote(self.replica, self.stats())


def worker_deployment(config: ServeConfig, replicas: int, cpus: float, gpus: float):
    """The ``HotswapWorker`` deployment: ``get_lease`` multiplexed over ``device_slots``."""

    class Worker(HotswapWorker):
        @serve.multiplexed(max_num_models_per_replica=config.device_slots)
        async def get_lease(self, name: str):
            return await self._load_and_lease(name)

    Worker.__name__ = Worker.__qualname__ = "HotswapWorker"
    return serve.deployment(Worker, name="HotswapWorker", num_replicas=replicas,
                            ray_actor_options={"num_cpus": cpus, "num_gpus": gpus},
                            max_ongoing_requests=4 * config.max_batch_size)


class RayBackend:
    """The backend interface of :mod:`~.backend` over the worker and directory deployments."""

    def __init__(self, model_name: str, worker: DeploymentHandle, directory: DeploymentHandle) -> None:
        self.model_name = model_name
        self.worker = worker
        self.directory = directory
        self.created = int(time.time())
        self.replica_stats: dict[str, dict] = {}

    async def knows(self, model: str) -> bool:
        return model == self.model_name or await self.directory.lookup.remote(model) is not None

    async def adapter_cards(self) -> list[dict[str, str]]:
        listed = await self.directory.list.remote()
        return [{"id": name, "root": entry["path"]} for name, entry in listed.items()]

    async def load_adapter(self, name: str, path: str) -> None:
        problem = await self.worker.check_adapter.remote(path)
        if problem is not None:
            raise ApiError(400, problem, "lora_path")
        if not await self.directory.add.remote(name, path):
            raise ApiError(400, f"The lora adapter '{name}' has already been loaded.", "lora_name")

    async def unload_adapter(self, name: str) -> None:
        if not await self.directory.remove.remote(name):
            raise ApiError(404, f"The lora adapter '{name}' cannot be found.", "lora_name")

    async def stats(self) -> dict:
        """What every replica last reported (also refreshes what ``/metrics`` shows)."""
        self.replica_stats = await self.directory.all_stats.remote()
        return {"replicas": self.replica_stats}

    refresh_stats = stats

    async def generate(self, body: CompletionRequest | ChatCompletionRequest) -> AsyncIterator[tuple[str, Any]]:
        """Events from a worker replica. A replica that dies before its first token is retried on
        another (up to ``RETRIES`` times); after a token has gone out, the failure is a 500."""
        adapter = "" if body.model == self.model_name else body.model
        if adapter and await self.directory.lookup.remote(adapter) is None:
            raise ApiError(404, f"The model `{body.model}` does not exist.", "model")
        handle = self.worker.options(stream=True, multiplexed_model_id=adapter)
        payload, chat = body.model_dump(), isinstance(body, ChatCompletionRequest)
        for attempt in range(self.RETRIES + 1):
            response = handle.generate.remote(payload, chat)
            started, replica = False, None
            try:
                async for kind, value in response:
                    if kind == "error":
                        raise ApiError(value["status"], value["message"], value["param"])
                    if kind == "replica":  # held back until the replica produced something
                        replica = value
                        continue
                    if not started:
                        started = True
                        yield "replica", replica
                    yield kind, value
                return
            except (RayActorError, ReplicaUnavailableError) as exc:
                if started or attempt == self.RETRIES:
                    raise ApiError(500, f"the replica serving this request failed: {exc}") from exc
                log.warning("replica died before the first token; retrying (%s)", exc)
            finally:
                response.cancel()  # a client that left stops its row on the replica
    RETRIES = 2


@serve.deployment(ray_actor_options={"num_cpus": 0})
@serve.ingress()
class Ingress:
    """The HTTP front: :func:`~.app.create_app` over :class:`RayBackend`."""

    def __init__(self, config: ServeConfig, model_name: str, worker: DeploymentHandle,
                 directory: DeploymentHandle) -> None:
        self.config = config
        self.backend = RayBackend(model_name, worker, directory)

    def __serve_build_asgi_app__(self):
        from .app import create_app
        from .metrics import ReplicaStatsCollector

        metrics = RequestMetrics([ReplicaStatsCollector(self.backend)])
        return create_app(self.backend, self.config, metrics)


def build_ray_app(config: ServeConfig, replicas: int = 2, worker_cpus: float = 1.0,
                  worker_gpus: float = 0.0) -> serve.Application:
    """The Ray Serve application: ``serve.run(build_ray_app(config, replicas=4))``."""
    from .default_model import MODEL_NAME
    from .demo_adapters import demo_adapter_paths

    adapters = dict(config.adapters)
    if config.model is None:
        adapters = {**{n: str(p) for n, p in demo_adapter_paths().items()}, **adapters}
    directory = AdapterDirectory.bind(adapters)
    threads = max(1, int(worker_cpus)) if worker_cpus else os.cpu_count() or 1
    worker = worker_deployment(config, replicas, worker_cpus, worker_gpus).bind(config, directory, threads)
    return Ingress.bind(config, config.model or MODEL_NAME, worker, directory)


def app_builder(args: dict[str, Any]) -> serve.Application:
    """For ``serve run hotswap_rt.serve.ray_app:app_builder key=value ...`` and ``serve deploy``
    config files: ``args`` are :class:`ServeConfig` fields plus ``replicas``, ``worker_cpus``,
    ``worker_gpus``."""
    args = dict(args)
    replicas = int(args.pop("replicas", 2))
    cpus = float(args.pop("worker_cpus", 1.0))
    gpus = float(args.pop("worker_gpus", 0.0))
    return build_ray_app(ServeConfig(**args), replicas=replicas, worker_cpus=cpus, worker_gpus=gpus)
