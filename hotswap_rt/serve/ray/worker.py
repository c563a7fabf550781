"""Ray Serve worker side: the replicas and the adapter directory (see :mod:`.app`).

- ``HotswapWorker``: one :class:`~hotswap_rt.serve.backend.LocalBackend` (runtime + generation
  engine) per replica. Its ``@serve.multiplexed`` loader loads the adapter if
  needed and returns a :class:`LeaseHandle` on its device slot; when Ray evicts it (LRU,
  ``max_num_models_per_replica = device_slots``) the lease is released once the requests using
  it have ended.
- ``AdapterDirectory``: the one list of adapters (name -> path, version) every replica
  resolves names through, and the replicas' last stats.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import random
import threading
import time
from typing import Any, AsyncIterator

from ray import serve
from ray.serve.handle import DeploymentHandle

from ...engine.sampling import RequestError
from ...errors import HotswapError, SelectionError, SlotsBusyError
from ..backend import LocalBackend
from ..compile_cache import use_compile_cache
from ..config import ServeConfig
from ..model import build_runtime
from ..protocol import (
    ApiError, ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeChatRequest,
    TokenizePromptRequest)

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
        if config.torch_threads is None:  # the replica's CPU share, unless configured
            config = dataclasses.replace(config, torch_threads=max(1, threads))
        self.compile_cache, warm = use_compile_cache(config.compile_cache)  # this node's, before compiling
        log.info("compile cache %s (%s)", self.compile_cache, "warm" if warm else "empty")
        self.backend = LocalBackend(config, build_runtime(config))
        self.backend.start()  # compiles before the replica takes traffic
        self.directory = directory
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.versions: dict[str, int] = {name: 1 for name in self.backend.adapter_names()}
        self.listing: dict[str, dict] = {}
        self._stats_changed = False
        self._background: asyncio.Task | None = None
        self.directory.report.remote(self.replica, self.stats())

    async def _leases_with_retries(self, names: list[str]) -> list[LeaseHandle]:
        """A lease on each of ``names`` (one adapter, or those a mix weights), all or none:
        Ray's cached lease, or a new one. When every slot is leased by requests in flight, Ray
        has just evicted its least-recently-used lease (released when its requests end): give
        back what this try took, then try again shortly (a random share longer, so two mixes
        that each hold what the other needs do not retry in step), each try evicting the next
        one, until the request's timeout."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.backend.config.request_timeout_s
        for attempt in itertools.count():
            taken: list[LeaseHandle] = []
            try:
                for name in names:
                    handle = await self.get_lease(name)  # Ray's cache, or _load_and_lease
                    handle.acquire()
                    taken.append(handle)
                return taken
            except SlotsBusyError:
                _release_uses(taken)
                if loop.time() > deadline:
                    what = repr(names[0]) if len(names) == 1 else f"all of {names}"
                    raise ApiError(503, f"no device slot became free for {what}") from None
                await asyncio.sleep(min(0.005 * 2 ** attempt, 0.1) * (1.0 + random.random()))
            except BaseException:
                _release_uses(taken)
                raise
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
        the adapter, or every adapter a mix weights, was already in this replica's device
        slots). A mix (``"adapters"``) is checked, then each adapter it weights is leased (all
        or none: see :meth:`_leases_with_retries`) and every adapter it names is loaded here.
        Errors travel as ``("error", {"status", "message", "param"})``."""
        name, handles = serve.get_multiplexed_model_id(), []
        rt = self.backend.served.rt
        tiers = {i.name: i.tier for i in rt.adapters()}
        mix = payload.get("adapters")
        leased = ([name] if name else []) + sorted(n for n, w in (mix or {}).items() if w != 0.0 and n != name)
        resident = all(tiers.get(n) == "device" for n in leased)
        yield "replica", {"id": self.replica, "resident": resident}
        try:
            body = (ChatCompletionRequest if chat else CompletionRequest).model_validate(payload)
            if body.adapters is not None:
                self._check_mix(body.adapters)  # before waiting for any slot
            entries = {n: await self._entry(n) for n in leased}
            handles = await self._leases_with_retries(leased)
            for n in [*leased, *(n for n in body.adapters or () if n not in entries)]:
                entry = entries.get(n) or await self._entry(n)
                if self.versions.get(n) != entry["version"]:  # re-added since leased, or weight 0
                    await asyncio.to_thread(self._ensure_loaded, rt, n, entry)
            async for event in _coalesced(self.backend.generate(body)):
                yield event
        except ApiError as exc:
            yield "error", exc.as_dict()
        except HotswapError as exc:  # the adapter could not be loaded or leased here
            yield "error", {"status": 400, "message": str(exc), "param": "model"}
        except Exception as exc:  # noqa: BLE001 - reported, the replica goes on
            yield "error", {"status": 500, "message": f"generation failed: {exc!r}", "param": None}
        finally:
            if handles:
                _release_uses(handles)
                self.backend.engine.notify()  # a released slot may let waiting rows run
            self._stats_changed = True
            self._start_background()

    def _check_mix(self, adapters: dict[str, float]) -> None:
        """What the engine checks of a mix before its names (see
        :meth:`~hotswap_rt.engine.GenerationEngine.check_mix`), as the single-process server
        answers it (400)."""
        try:
            self.backend.engine.check_mix(adapters)
        except RequestError as exc:
            raise ApiError(400, str(exc), exc.param) from exc
        except SelectionError as exc:
            raise ApiError(400, str(exc), "adapters") from exc

    def check_adapter(self, path: str) -> str | None:
        """Validate ``path`` against this replica's runtime; the problem, or None."""
        try:
            self.backend.served.rt.check(path)
        except HotswapError as exc:
            return str(exc)
        return None

    async def tokenize(self, payload: dict, chat: bool) -> dict:
        """``LocalBackend.tokenize`` here: ``{"ok": answer}`` or ``{"error": ...}``."""
        try:
            body = (TokenizeChatRequest if chat else TokenizePromptRequest).model_validate(payload)
            return {"ok": await self.backend.tokenize(body)}
        except ApiError as exc:
            return {"error": exc.as_dict()}

    async def detokenize(self, payload: dict) -> dict:
        try:
            return {"ok": await self.backend.detokenize(DetokenizeRequest.model_validate(payload))}
        except ApiError as exc:
            return {"error": exc.as_dict()}

    def stats(self) -> dict:
        return {"replica": self.replica, "compile_cache": str(self.compile_cache), **self.backend.stats()}

def _release_uses(handles: list[LeaseHandle]) -> None:
    for handle in handles:
        handle.release_use()


async def _coalesced(events: AsyncIterator[tuple[str, Any]]) -> AsyncIterator[tuple[str, Any]]:
    """``events`` with consecutive token events of one choice that are ready together merged
    into one (texts joined, logprobs concatenated), so a busy replica sends fewer, larger messages (each yield
    is one Ray object)."""
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
    nothing = object()
    pending: Any = nothing  # an event (or the end marker) taken while merging, handled next
    try:
        while True:
            event = pending if pending is not nothing else await queue.get()
            pending = nothing
            if event is None:
                return
            if event[0] == "__raise__":
                raise event[1]
            if event[0] == "token":
                index = event[1]["index"]
                text, logprobs = [event[1]["text"]], event[1]["logprobs"]
                while not queue.empty():
                    following = queue.get_nowait()
                    if following is None or following[0] != "token" or following[1]["index"] != index:
                        pending = following
                        break
                    text.append(following[1]["text"])
                    if logprobs is not None:
                        logprobs = logprobs + (following[1]["logprobs"] or [])
                event = ("token", {"index": index, "text": "".join(text), "logprobs": logprobs})
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
                            max_ongoing_requests=4 * config.max_num_seqs)
