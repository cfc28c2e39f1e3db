"""``coloproxy lab up --qemu-filters``: the lab drives COLO itself, QEMU's colo-compare decides.

With QEMU's own filters no coloproxy daemon runs, so no engine: a small driver of the lab's,
:class:`QemuFiltersDriver` (a process of its own, ``python3 -m coloproxy.lab.filters``), enters
COLO (:func:`lab_bring_up_colo`) and runs COLO-FT.txt's failover when a QEMU's monitor
connection drops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from pathlib import Path

from coloproxy.lab import vms
from coloproxy.lab.configs import PERIOD_MS, LabPaths, migrate_uri
from coloproxy.lab.lab import COLO_TIMEOUT_S, DEFAULT_PREFIX, LabState
from coloproxy.lab.topology import GUEST_PORT, LAN_BRIDGE, Topology
from coloproxy.lab.vms import LabError, Monitor

log = logging.getLogger(__name__)


async def lab_bring_up_colo(
    primary: Monitor, secondary: Monitor, uri: str, period_ms: int, timeout: float
) -> float:
    """Enable x-colo, migrate, wait until both QEMUs are in COLO; seconds from migrate.

    The lab's own bring-up, for ``--qemu-filters`` (no coloproxy daemon, so no engine); with
    our proxy the engine does this (``engine.migrate_uri``, ``engine.bring_up``).
    """
    caps = [{"capability": "x-colo", "state": True}]
    await primary.execute("migrate-set-capabilities", {"capabilities": caps})
    if await vms.qemu_version(primary) >= (8, 1):  # QEMU 8.1 wants it on the secondary too
        await secondary.execute("migrate-set-capabilities", {"capabilities": caps})
    await primary.execute("migrate-set-parameters", {"x-checkpoint-delay": period_ms})
    started = time.monotonic()
    await primary.execute("migrate", {"uri": uri})
    while True:
        modes = (await vms.colo_mode(primary), await vms.colo_mode(secondary))
        if modes == ("primary", "secondary"):
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            info = await primary.execute("query-migrate")
            raise LabError(
                f"no COLO within {timeout:.0f} s after migrate: modes {modes}, "
                f"migration {info.get('status')}"
            )
        await asyncio.sleep(0.05)


class QemuFiltersDriver:
    """Brings up and fails over a pair wired with QEMU's own filters (COLO-FT.txt).

    colo-compare asks for checkpoints inside QEMU, so this only enters COLO
    (:func:`lab_bring_up_colo`) and, when a QEMU's QMP connection drops (it exited or was
    killed), runs COLO-FT.txt's failover on the survivor. It sees local QEMUs only: no
    heartbeat, no lost host with a running QEMU; the engine does that for our proxy.
    """

    def __init__(self, paths: LabPaths, prefix: str) -> None:
        self.paths = paths
        self.topology = Topology(prefix, guests="tap")
        self.primary = Monitor("primary", paths.qmp_socket("primary"))
        self.secondary = Monitor("secondary", paths.qmp_socket("secondary"))
        self.failed_over = False

    async def run(self) -> None:
        await self.primary.connect()
        await self.secondary.connect()
        took = await lab_bring_up_colo(
            self.primary, self.secondary, migrate_uri(), PERIOD_MS, COLO_TIMEOUT_S
        )
        log.info("COLO reached %.2f s after migrate", took)
        await asyncio.gather(self._watch("primary"), self._watch("secondary"))

    async def _watch(self, role: str) -> None:
        monitor = self.primary if role == "primary" else self.secondary
        await monitor.closed.wait()
        if self.failed_over:
            return
        self.failed_over = True
        survivor = self.secondary if role == "primary" else self.primary
        log.warning("the %s QEMU is gone: failover to the %s", role, survivor.role)
        started = time.monotonic()
        if survivor is self.primary:
            for name in ("comp0", "iothread1", "m0", "redire0", "redire1"):
                with contextlib.suppress(LabError):
                    await survivor.execute("object-del", {"id": name})
            await survivor.execute("x-colo-lost-heartbeat")
        else:
            await survivor.execute("x-colo-lost-heartbeat")
            for name in ("f2", "f1"):  # the redirectors to a primary that is gone
                with contextlib.suppress(LabError):
                    await survivor.execute("object-del", {"id": name})
            await asyncio.to_thread(self._attach_secondary_to_lan)
            with contextlib.suppress(LabError):
                await survivor.execute(
                    "announce-self", {"initial": 50, "max": 550, "rounds": 5, "step": 100}
                )
        log.info("failover done in %.3f s", time.monotonic() - started)

    def _attach_secondary_to_lan(self) -> None:
        """Host S's guest port into its LAN bridge (no daemon: the topology's names)."""
        self.topology.exec("hs", ["ip", "link", "set", GUEST_PORT, "master", LAN_BRIDGE, "up"])


def run_qemu_filters_driver(run_dir: Path) -> int:
    """The driver of a ``--qemu-filters`` lab, as a process of its own."""
    logging.basicConfig(level="INFO", format="%(asctime)s %(name)s %(levelname)s %(message)s")
    paths = LabPaths(run_dir)
    state = LabState.load(paths)
    driver = QemuFiltersDriver(paths, state.prefix if state else DEFAULT_PREFIX)
    try:
        asyncio.run(driver.run())
    except LabError as exc:
        log.error("%s", exc)
        return 2
    return 0


if __name__ == "__main__":  # python3 -m coloproxy.lab.filters filters-driver RUN_DIR
    if len(sys.argv) == 3 and sys.argv[1] == "filters-driver":
        sys.exit(run_qemu_filters_driver(Path(sys.argv[2])))
    print("usage: python3 -m coloproxy.lab.filters filters-driver RUN_DIR")
    sys.exit(2)
