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
import itertools
import logging
import os
import threading
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


class LeaseHandle:
    """What the multiplexed loader returns: an adapter's :class:`~hotswap_rt.AdapterLease`,
    released when Ray evicts the handle (``__del__``, which Ray may call more than once and
    from another thread) *and* no request that took it is still running, so a slot a running
    batch reads is released only when that batch ends."""

    def __init__(self, lease) -> None:
        self.lease = lease
        self._uses = 0
        self._evicted = False
        self._lock = threading.Lock()

    def acquire(self) -> None:
        with self._lock:
            self._uses += 1

    def release_use(self) -> None:
        with self._lock:
            self._uses -= 1
            done = self._evicted and self._uses == 0
        if done:
            self._release()

    def __del__(self) -> None:
        with self._lock:
            self._evicted = True
            done = self._uses == 0
        if done:
            self._release()

    def _release(self) -> None:
        self.lease.release()  # idempotent


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
        self.listing: dict[str, dict] = {}
        self._stats_changed = False
        self._background: asyncio.Task | None = None
        self.directory.report.remote(self.replica, self.stats())

    async def _lease_with_retries(self, name: str) -> LeaseHandle:
        """Ray's cached lease, or a new one. When every slot is leased by requests in flight,
        Ray has just evicted its least-recently-used lease (released when its requests end):
        try again shortly, each try evicting the next one, until the request's timeout."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.backend.config.request_timeout_s
        for attempt in itertools.count():
            try:
                handle = await self.get_lease(name)  # Ray's cache, or _load_and_lease
                handle.acquire()
                return handle
            except SlotsBusyError:
                if loop.time() > deadline:
                    raise ApiError(503, f"no device slot became free for {name!r}") from None
                await asyncio.sleep(min(0.005 * 2 ** attempt, 0.1))
        raise AssertionError("unreachable")

    async def _entry(self, name: str) -> dict:
        """``{"path", "version"}`` of ``name`` from the cached listing (refreshed on a miss)."""
        self._start_background()
        if name not in self.listing:
            self.listing = await self.directory.list.remote()
        if name not in self.listing:
            raise ApiError(404, f"The model `{name}` does not exist.", "model")
        return self.listing[name]

    def _ensure_loaded(self, rt, name: str, entry: dict) -> None:
        if self.versions.get(name) != entry["version"]:
            rt.load(name, entry["path"], replace=name in self.versions)
            self.versions[name] = entry["version"]

    async def _load_and_lease(self, name: str):
        entry = await self._entry(name)

        def load_and_lease(rt):
            self._ensure_loaded(rt, name, entry)
            return LeaseHandle(rt.lease(name))  # SlotsBusyError: nothing cached by Ray

        # Off the engine thread: the runtime never evicts a slot the running batch reads, so
        # this waits for one forward at most, not for the whole batch.
        return await asyncio.to_thread(load_and_lease, self.backend.served.rt)

    def _start_background(self) -> None:
        if self._background is None or self._background.done():
            self._background = asyncio.get_running_loop().create_task(self._sync_loop())

    async def _sync_loop(self) -> None:
        """Every ``SYNC_PERIOD_S``: take the directory's listing, unload what it no longer lists
        (a runtime unload reaches every replica), and report stats if they changed."""
        while True:
            try:
                self.listing = await self.directory.list.remote()
                stale = [name for name in list(self.versions) if name not in self.listing]
                if stale:
                    await asyncio.wrap_future(self.backend.engine.call(
                        lambda rt: [self._forget(rt, name) for name in stale]))
                if self._stats_changed or stale:
                    self._stats_changed = False
                    await self.directory.report.remote(self.replica, self.stats())
            except Exception:  # noqa: BLE001 - try again next period
                log.exception("directory sync failed")
            await asyncio.sleep(self.SYNC_PERIOD_S)

    def _forget(self, rt, name: str) -> None:
        rt.unload(name, force=True)
        self.versions.pop(name, None)

    SYNC_PERIOD_S = 0.25

    async def generate(self, payload: dict, chat: bool) -> AsyncIterator[tuple[str, Any]]:
        """Events of one request; the first is ``("replica", {"id", "resident"})`` (resident:
        the adapter was already in one of this replica's device slots). Errors travel as
        ``("error", {"status", "message", "param"})``."""
        name, handle = serve.get_multiplexed_model_id(), None
        tiers = {i.name: i.tier for i in self.backend.served.rt.adapters()}
        yield "replica", {"id": self.replica, "resident": not name or tiers.get(name) == "device"}
        try:
            body = (ChatCompletionRequest if chat else CompletionRequest).model_validate(payload)
            if name:
                entry = await self._entry(name)
                handle = await self._lease_with_retries(name)
                if self.versions.get(name) != entry["version"]:  # re-added since it was leased
                    await asyncio.to_thread(self._ensure_loaded, self.backend.served.rt, name, entry)
            async for event in _coalesced(self.backend.generate(body)):
                yield event
        except ApiError as exc:
            yield "error", exc.as_dict()
        except HotswapError as exc:  # the adapter could not be loaded or leased here
            yield "error", {"status": 400, "message": str(exc), "param": "model"}
        except Exception as exc:  # noqa: BLE001 - reported, the replica goes on
            yield "error", {"status": 500, "message": f"generation failed: {exc!r}", "param": None}
        finally:
            if handle is not None:
                handle.release_use()
                self.backend.engine.notify()  # a released slot may let waiting rows run
            self._stats_changed = True
            self._start_background()

    def check_adapter(self, path: str) -> str | None:
        """Validate ``path`` against this replica's runtime; the problem, or None."""
        try:
            self.backend.served.rt.check(path)
        except HotswapError as exc:
            return str(exc)
        return None

    def stats(self) -> dict:
        return {"replica": self.replica, **self.backend.stats()}

async def _coalesced(events: AsyncIterator[tuple[str, Any]]) -> AsyncIterator[tuple[str, Any]]:
    """``events`` with consecutive text deltas that are ready together merged into one, so a
    busy replica sends fewer, larger messages (each yield is one Ray object)."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump() -> None:
        try:
            async for event in events:
                queue.put_nowait(event)
        except BaseException as exc:  # noqa: BLE001 - re-raised below, in the consumer
            queue.put_nowait(("__raise__", exc))
        finally:
            queue.put_nowait(None)

    task = asyncio.get_running_loop().create_task(pump())
    try:
        while True:
            event = await queue.get()
            if event is None:
                return
            if event[0] == "__raise__":
                raise event[1]
            if event[0] == "token":
                text = [event[1]]
                while not queue.empty() and queue._queue[0] is not None and queue._queue[0][0] == "token":  # noqa: SLF001
                    text.append(queue.get_nowait()[1])
                event = ("token", "".join(text))
            yield event
    finally:
        task.cancel()
        await events.aclose()


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

    async def generate(self, body: CompletionRequest | ChatCompletionRequest) -> AsyncIterator[tuple[str, Any]]:
        """Events from a worker replica. A replica that dies before its first token is retried on
        another (up to ``RETRIES`` times); after a token has gone out, the failure is a 500."""
        adapter = "" if body.model == self.model_name else body.model
        if adapter and not await self.knows(adapter):
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


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1024)
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
