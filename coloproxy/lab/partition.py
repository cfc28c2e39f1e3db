"""Network partitions in the lab (``coloproxy lab partition NAME`` / ``heal``).

A cut is silent, as a broken switch port or cable between two live machines usually is: the
links keep their carrier and addresses, and an nftables table of the lab's (``cplabcut``)
inside the cut host's namespace drops its frames (bridge family, on host P's or host S's
``uplink``: the guest's traffic to the LAN) and its packets (inet family, on ``mgmt``: its
own LAN address, where its etcd member and its LAN heartbeats live; on ``repl``: the
replication link). The drop comes after coloproxy's own rules (priority 200): P-out still
sees and releases the guest's packets, which then go nowhere. ``--freeze`` also stops every
process of the host (SIGSTOP: its daemon, QEMU and etcd member), as a hung machine;
``heal`` removes every cut and resumes what it froze.

| name | cuts |
|---|---|
| ``repl`` | the replication link only (host P's end) |
| ``hp-lan`` | host P from the LAN: its guest's uplink and its own LAN address |
| ``hp`` | host P from everything: LAN and replication link |
| ``hs-lan`` | host S from the LAN |
| ``hs`` | host S from everything |
| ``witness`` | the witness from the LAN |
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
from pathlib import Path

from coloproxy.errors import ColoproxyError
from coloproxy.lab.topology import MGMT, REPLICATION, UPLINK, Topology
from coloproxy.net import netns

TABLE = "cplabcut"
# name -> (host, bridge ports, inet interfaces)
CUTS: dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]] = {
    "repl": ("hp", (), (REPLICATION,)),
    "hp-lan": ("hp", (UPLINK,), (MGMT,)),
    "hp": ("hp", (UPLINK,), (MGMT, REPLICATION)),
    "hs-lan": ("hs", (UPLINK,), (MGMT,)),
    "hs": ("hs", (UPLINK,), (MGMT, REPLICATION)),
    "witness": ("wit", (), (MGMT,)),
}


class PartitionError(ColoproxyError):
    """A partition cannot be made or healed."""


def rules(bridge_ports: tuple[str, ...], interfaces: tuple[str, ...]) -> str:
    """The nftables text of one cut (pure)."""
    lines = []
    if bridge_ports:
        drops = "".join(
            f'    iifname "{port}" drop\n    oifname "{port}" drop\n' for port in bridge_ports
        )
        lines.append(
            f"table bridge {TABLE} {{\n  chain forward {{\n"
            f"    type filter hook forward priority 200; policy accept;\n{drops}  }}\n}}\n"
        )
    if interfaces:
        ins = "".join(f'    iifname "{name}" drop\n' for name in interfaces)
        outs = "".join(f'    oifname "{name}" drop\n' for name in interfaces)
        lines.append(
            f"table inet {TABLE} {{\n"
            f"  chain input {{\n    type filter hook input priority -200; policy accept;\n"
            f"{ins}  }}\n"
            f"  chain output {{\n    type filter hook output priority 200; policy accept;\n"
            f"{outs}  }}\n}}\n"
        )
    return "".join(lines)


def _frozen_file(run_dir: Path) -> Path:
    return run_dir / "frozen.json"


def cut(topology: Topology, name: str, run_dir: Path, *, freeze: bool = False) -> str:
    """Make the cut ``name``; a sentence saying what was cut."""
    if name not in CUTS:
        raise PartitionError(f"no partition {name!r}; the names are {', '.join(CUTS)}")
    host, bridge_ports, interfaces = CUTS[name]
    if host == "wit" and not topology.witness:
        raise PartitionError("this lab has no witness (two-host mode)")
    done = topology.exec(
        host, ["nft", "-f", "-"], input=rules(bridge_ports, interfaces), check=False
    )
    if done.returncode != 0:
        raise PartitionError(f"nft in {topology.ns(host)}: {done.stderr.strip()}")
    what = ", ".join([*(f"{p} (bridge)" for p in bridge_ports), *interfaces])
    if freeze:
        stopped = [pid for pid in netns.pids(topology.ns(host)) if pid != os.getpid()]
        for pid in stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
        path = _frozen_file(run_dir)
        earlier = json.loads(path.read_text()) if path.exists() else []
        path.write_text(json.dumps(sorted({*earlier, *stopped})))
        what += f"; {len(stopped)} processes frozen"
    return f"{topology.ns(host)}: cut {what}"


def heal(topology: Topology, run_dir: Path) -> str:
    """Remove every cut and resume every frozen process."""
    removed = 0
    for role in topology.roles():
        if not netns.exists(topology.ns(role)):
            continue
        for family in ("bridge", "inet"):
            done = topology.exec(
                role, ["nft", "delete", "table", family, TABLE], check=False, timeout=10.0
            )
            removed += done.returncode == 0
    path = _frozen_file(run_dir)
    resumed = 0
    if path.exists():
        for pid in json.loads(path.read_text()):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
                resumed += 1
        path.unlink()
    return f"healed: {removed} cut tables removed, {resumed} processes resumed"


__all__ = ["CUTS", "PartitionError", "cut", "heal", "rules"]
