"""Host S joins the LAN at a takeover: the guest port into the LAN bridge, then the SYN
replay and the backoff revert (shell; docs/data-path.md, "Host S").

The engine calls :meth:`LanTakeover.attach_guest_to_lan` as its ``attach_lan`` after it told
the proxy ``failover``; an ``attach-lan`` message runs it too (tests, external engines), so
both paths are this one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from coloproxy.daemon.state import DaemonState
from coloproxy.net import NetError
from coloproxy.net import host as hostnet

# The daemon's log name, as before this moved out of coloproxy/daemon/run.py: journal
# filters match on it.
log = logging.getLogger("coloproxy.daemon.run")

# The replay runs on the loop, which the engine or the control server awaits meanwhile: a
# few milliseconds. The bound only keeps a worker thread from outliving a stopping loop.
REPLAY_TIMEOUT = 5.0


class LanTakeover:
    def __init__(
        self,
        state: DaemonState,
        params: Callable[[], hostnet.HostNet],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self._state = state
        self._params = params  # the net layer's parameters of the config in force
        self._loop = loop

    def attach_guest_to_lan(self) -> int:
        """The takeover's step into the LAN (blocking: a worker thread runs it), then the SYN
        replay; the number of SYNs replayed."""
        params = self._params()
        addresses: tuple[bytes, list[bytes]] | None = None
        if self._state.secondary is not None:
            try:  # before the move, which flushes the port's learnt FDB entries
                addresses = hostnet.guest_port_addresses(params)
            except NetError as exc:
                log.error("the guest's MAC address is unknown, no SYN replay: %s", exc)
        hostnet.attach_guest_to_lan(params)
        replay = asyncio.run_coroutine_threadsafe(
            self._replay_syns(params.guest_port, addresses), self._loop
        )
        try:
            return replay.result(timeout=REPLAY_TIMEOUT)
        except TimeoutError:
            replay.cancel()
            log.error("the SYN replay did not run within %.0f s", REPLAY_TIMEOUT)
            return 0

    async def _replay_syns(
        self, guest_port: str, addresses: tuple[bytes, list[bytes]] | None
    ) -> int:
        """On the loop (the rewriter's home), now that the SVM's output goes to the LAN: hand
        the SVM the client SYNs of connections still half-open on it, and the ICMP messages
        that revert the retransmission backoff of the connections the client was heard on
        (docs/data-path.md, "Host S"); the number of SYNs replayed."""
        secondary = self._state.secondary
        if secondary is None or addresses is None:
            return 0
        if not secondary.rewriter.taken_over:
            log.error("guest port in the LAN without a failover before: no SYN replay")
            return 0
        source, guests = addresses
        now = self._loop.time()
        syns, syn_frames = secondary.syn_replay_frames(now, source, guests)
        reverted, revert_frames = secondary.backoff_revert_frames(now, source, guests)
        if (syns or reverted) and not guests:
            log.warning(
                "no MAC learnt for the guest on %s: %d SYN(s) not replayed, %d connection(s)"
                " not told to retransmit",
                guest_port,
                syns,
                reverted,
            )
            return 0
        # The SYNs first: a half-open connection needs nothing else, and the ICMP messages
        # concern established ones only.
        frames = syn_frames + revert_frames
        if frames:
            try:
                hostnet.send_to_guest(guest_port, frames)
            except NetError as exc:
                log.error("SYN replay and backoff revert: %s", exc)
                return 0
            secondary.counters.syns_replayed += syns
            secondary.counters.backoff_reverts += reverted
        log.info(
            "replayed %d client SYN(s) of connections half-open on the SVM; reverted the"
            " retransmission backoff of %d connection(s)",
            syns,
            reverted,
        )
        return syns
