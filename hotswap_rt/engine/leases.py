"""The leases the engine holds on its running requests' adapters: one lease per adapter, counted
per running sequence, so a running adapter never leaves its device slot."""

from __future__ import annotations

from ..errors import HotswapError, SlotsBusyError
from ..residency import AdapterLease
from ..runtime import HotswapRuntime


class AdapterLeases:
    """Leases of ``rt``'s adapters by name, with how many running sequences use each."""

    def __init__(self, rt: HotswapRuntime) -> None:
        self.rt = rt
        self._held: dict[str, tuple[AdapterLease, int]] = {}

    def __len__(self) -> int:
        return len(self._held)

    def acquire(self, names: list[str]) -> bool:
        """Hold a lease on every adapter in ``names`` for one more sequence; False (nothing
        held) while the slots or the per-forward adapter limit are full.

        Raises:
            HotswapError: an adapter cannot be made resident for another reason (e.g. its
                background load failed); nothing is held.
        """
        new = [n for n in names if n not in self._held]
        if len(self._held) + len(new) > self.rt.config.max_active_adapters:
            return False
        if new:  # the last forward's selection must not hold slots: leases protect running rows
            self.rt.activate(None)
        taken: list[str] = []
        try:
            for name in new:
                self._held[name] = (self.rt.lease(name), 0)
                taken.append(name)
        except HotswapError as exc:
            for name in taken:
                self._held.pop(name)[0].release()
            if isinstance(exc, SlotsBusyError):
                return False
            raise
        for name in names:
            lease, count = self._held[name]
            self._held[name] = (lease, count + 1)
        return True

    def release(self, names: list[str]) -> None:
        """One sequence fewer uses each of ``names``; a lease no sequence uses is released."""
        for name in names:
            lease, count = self._held[name]
            if count > 1:
                self._held[name] = (lease, count - 1)
            else:
                del self._held[name]
                lease.release()

    def forget_unloaded(self, known: set[str]) -> None:
        """Drop the entries of adapters that are no longer loaded (their leases are void)."""
        self._held = {n: v for n, v in self._held.items() if n in known}
