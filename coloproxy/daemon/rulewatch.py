"""The daemon's watch over its own iptables rules (shell).

Another firewall manager (a ``netfilter-persistent`` restore, a ``firewalld`` reload, an
operator's ``iptables -F``) may remove the pair's chain or its ``FORWARD`` jump while the
daemon runs. Without them nothing is queued: on host P the PVM's output goes to the client
uncompared (I1) and on host S the SVM gets the client's packets unshifted. That is failing
open, not closed, and stopping the daemon would not close it: only the rules stop the
traffic. So the watch restores them, within one check period (``net.rules_check_ms``),
says so in the log and counts it (``coloproxy_rules_restored_total``), and the daemon
asks for a checkpoint on host P, since output left uncompared meanwhile (``rules-restored``).
An alert on the counter tells the operator that something keeps removing them.

The check reads ``iptables-save``/``ip6tables-save`` in a worker thread: a few milliseconds
every few seconds, never on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Callable

from coloproxy.net import NetError
from coloproxy.net import host as hostnet

log = logging.getLogger(__name__)


class RuleWatch:
    """Check every ``interval`` seconds (0: never); restore what is missing and tell
    ``restored`` which families and what was missing."""

    def __init__(
        self,
        params: Callable[[], hostnet.HostNet],
        interval: float,
        restored: Callable[[dict[str, tuple[str, ...]]], None],
        *,
        active: Callable[[], bool] = lambda: True,
    ) -> None:
        self._params = params
        self.interval = interval
        self._restored = restored
        self._active = active  # False while the daemon changes its set-up itself (reprotect)
        self.restores: Counter[str] = Counter()  # by family: ipv4, ipv6
        self.check_failures = 0
        self._task: asyncio.Task[None] | None = None
        self._failing = False

    def start(self) -> None:
        if self._task is None and self.interval > 0:
            self._task = asyncio.create_task(self._run(), name="rule-watch")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def set_interval(self, interval: float) -> None:
        """A new period (a reload): restart the timer with it; 0 stops the checks."""
        self.interval = interval
        await self.stop()
        self.start()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            if self._active():
                await self.check()

    async def check(self) -> dict[str, tuple[str, ...]]:
        """One check, and the restore when needed; what was missing, by family."""
        params = self._params()
        try:
            missing = await asyncio.to_thread(hostnet.check_rules, params)
            if missing:
                what = "; ".join(f"{family}: {', '.join(p)}" for family, p in missing.items())
                log.error(
                    "the NFQUEUE rules of pair %s were changed behind our back (%s):"
                    " restoring them",
                    params.pair,
                    what,
                )
                await asyncio.to_thread(hostnet.apply_rules, params)
                self.restores.update(missing.keys())
                log.warning("rules of pair %s restored", params.pair)
        except NetError as exc:
            self.check_failures += 1
            if not self._failing:  # once until a check works again
                log.error("cannot check the rules of pair %s: %s", params.pair, exc)
            self._failing = True
            return {}
        if self._failing:
            log.info("the rules of pair %s can be checked again", params.pair)
            self._failing = False
        if missing:
            self._restored(missing)
        return missing


__all__ = ["RuleWatch"]
