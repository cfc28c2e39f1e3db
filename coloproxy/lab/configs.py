"""The configs of the lab's two daemons, generated from the topology's names (pure text).

``coloproxy lab`` needs no config file: it writes these two texts into its run directory and
starts ``coloproxy run -c`` with them inside host P's and host S's namespaces.
``configs/lab.yaml`` and ``configs/lab-secondary.yaml`` are the same texts for the default
run directory, written out so that an operator can read them and run a daemon by hand;
``tests/test_lab.py`` checks that they stay equal to what this module generates
(``python3 -m coloproxy.lab.configs`` rewrites them).

Every name comes from :mod:`coloproxy.lab.topology` (guest port, LAN bridge, replication
link and addresses), every path from the run directory, so a topology change shows up here
and in the files' equality test, not as a daemon that cannot find its interface.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from coloproxy.lab.topology import (
    GUEST_PORT,
    LAN_BRIDGE,
    MGMT_IPV4,
    REPLICATION,
    REPLICATION_IPV4,
)

DEFAULT_RUN_DIR = Path("/run/coloproxy-lab")
PAIR_NAME = "lab"
NET_PREFIX = "cp"
# The secondary QEMU's -incoming listens here, on host S's replication address: the
# migration stream crosses the replication link like it would between two machines.
MIGRATION_PORT = 7790
# The secondary's NBD export of its disk (disk.nbd_port), on its replication address.
NBD_PORT = 7791
# With QEMU's own filters (coloproxy/lab/vms.py): the primary listens for the secondary's two
# redirectors on its replication address (COLO-FT.txt's 9003/9004), and loops its compare
# chardevs on loopback; with --chardev coloproxy takes colo-compare's place on them.
FILTER_PORTS = {"mirror": 7793, "compare_secondary": 7794, "compare_primary": 7795, "out": 7796}
# The guest's disk: a raw image per host, the secondary's active and hidden disks beside it
# (docs/lab.md, "The disk").
DISK_SIZE_MIB = 64
DISK_FS_MIB = 60  # the guest's file system; the last 4 MiB are the tests' (zero at start)
# The engines' heartbeat between host P and host S, over the replication link: the engine's
# defaults, written out (docs/configuration.md).
HEARTBEAT_PORT = 9478
# Under TCG a checkpoint pauses the guest for 2-10 ms (qemu/README.md); a 2 s period keeps
# the loop busy enough to be seen in a demo without slowing the guest down.
PERIOD_MS = 2000
MIN_GAP_MS = 100
HEARTBEAT_INTERVAL_MS = 50
FAILOVER_TIMEOUT_MS = 300
FILES = {"primary": "lab.yaml", "secondary": "lab-secondary.yaml"}
ETCD_CLIENT_PORT = 2379
# Keys under <prefix>/lab/: the lab's cluster could hold other pairs' keys too.
QUORUM_PREFIX = "/coloproxy-lab"


def etcd_endpoints(first: str) -> str:
    """The lab's etcd members as a YAML flow list, host ``first``'s own member first."""
    hosts = sorted(MGMT_IPV4, key=lambda host: (host != first, host))
    return "[" + ", ".join(f"{MGMT_IPV4[host]}:{ETCD_CLIENT_PORT}" for host in hosts) + "]"


_QUORUM = """\
  # Failover is decided by a leader key in the lab's etcd: one member on host P, host S and
  # the witness, on their LAN addresses (docs/lab.md). `coloproxy lab up --two-host` leaves
  # this out: the two-host mode, for labs only (a cut link can make both hosts serve).
  quorum:
    service: etcd
    endpoints: {endpoints} # this host's member first
    prefix: {quorum_prefix}
"""


@dataclass(frozen=True, slots=True)
class LabPaths:
    """Where one lab keeps its sockets, logs and state (the run directory)."""

    run_dir: Path = DEFAULT_RUN_DIR
    # Where host S's active and hidden disks go (default: the run directory); a test puts
    # them on a small file system of their own to fill it.
    disk_dir: Path | None = None

    def control_socket(self, role: str) -> Path:
        """The control socket of the daemon on ``role``'s host (``control.socket``)."""
        return self.run_dir / f"{role}.sock"

    def qmp_socket(self, role: str) -> Path:
        """The QMP monitor the engine of ``role``'s host uses."""
        return self.run_dir / f"{role}-qmp.sock"

    def lab_qmp_socket(self, role: str) -> Path:
        """A second QMP monitor that only the lab uses (one client per monitor socket)."""
        return self.run_dir / f"{role}-lab-qmp.sock"

    def serial_log(self, role: str) -> Path:
        """The guest's serial console on ``role``'s host (its ready and checker lines)."""
        return self.run_dir / f"{role}.serial"

    def qemu_log(self, role: str) -> Path:
        """The QEMU's own stdout and stderr."""
        return self.run_dir / f"{role}-qemu.log"

    def daemon_log(self, role: str) -> Path:
        """The ``coloproxy run`` daemon's log on ``role``'s host."""
        return self.run_dir / f"{role}-coloproxy.log"

    def config(self, role: str) -> Path:
        """The daemon's config file, as ``lab up`` writes it (:func:`config_text`)."""
        return self.run_dir / FILES[role]

    def disk_image(self, role: str) -> Path:
        """The guest's disk on ``role``'s host (host P's is "primary", as for every path)."""
        return self.run_dir / f"{role}-disk.img"

    def disk_active(self, role: str) -> Path:
        return (self.disk_dir or self.run_dir) / f"{role}-disk-active.qcow2"

    def disk_hidden(self, role: str) -> Path:
        return (self.disk_dir or self.run_dir) / f"{role}-disk-hidden.qcow2"

    @property
    def state(self) -> Path:
        return self.run_dir / "state.json"

    @property
    def heartbeat_key(self) -> Path:
        """The heartbeats' HMAC key, shared by the two daemons (written by ``lab up``)."""
        return self.run_dir / "heartbeat.key"


def migrate_uri() -> str:
    return f"tcp:{REPLICATION_IPV4['hs']}:{MIGRATION_PORT}"


def reprotect_uri() -> str:
    """After a failover and ``lab reprotect``: the new secondary QEMU listens on host P."""
    return f"tcp:{REPLICATION_IPV4['hp']}:{MIGRATION_PORT}"


# The lab's paths are named after the hosts' first roles: "primary" is host P's (its control
# socket, QMP monitors, console), "secondary" host S's, whatever role each host has now.
REPROTECT_FILE = "lab-hp-secondary.yaml"


_DISK = """
disk:
  # The guest's disk, replicated by QEMU's block replication, which the engine drives
  # (docs/engine.md, "The disk"). This host's files; `coloproxy lab up` makes them.
  image: {image} # raw, {size} MiB
  format: raw
  active: {active} # qcow2: the SVM's writes between checkpoints
  hidden: {hidden} # qcow2: the base's contents the primary overwrote
  nbd_port: {nbd_port} # the secondary's NBD export, on its replication address
"""


_PRIMARY = """\
# coloproxy configuration for the one-machine lab: host P (role primary) of the pair "{pair}".
#
# Generated by coloproxy/lab/configs.py from the lab topology's names; `coloproxy lab up`
# writes this text into {run_dir} and runs `coloproxy run -c` with it inside host P's
# namespace. tests/test_lab.py checks that configs/lab.yaml stays equal to it. Host S's file
# is configs/lab-secondary.yaml. docs/lab.md describes the lab, docs/configuration.md every
# key.

pair:
  name: {pair}
  role: primary

net:
  prefix: {prefix}
  guest_port: {guest_port} # the PVM's tap, opened by QEMU in host P's namespace
  lan_bridge: {lan_bridge}
  replication:
    local: {primary_address} # host P on the replication link
    remote: {secondary_address} # host S
  underlay: {underlay}

compare:
  # Under TCG the SVM answers late right after a checkpoint (its translated code is gone):
  # keep QEMU's 3 s.
  compare_timeout: 3.0
  # MLD reports and router solicitations go out after random delays (RFC 3810, RFC 4861):
  # the two guests never send them in step. Multicast control traffic is not protected.
  passthrough:
    - {{protocol: icmpv6, peer_network: "ff00::/8"}}

control:
  socket: {primary_socket}

metrics:
  # Inside host P's namespace: its own loopback.
  listen: 127.0.0.1:9477

engine:
  qmp: {primary_qmp} # the primary QEMU's QMP monitor (the lab has its own, a second one)
  # The secondary QEMU's -incoming, on host S's replication address: the engine enables
  # x-colo and migrates there once host S's engine says its QEMU waits.
  migrate_uri: {migrate_uri}
  bring_up: true
  period_ms: {period_ms} # the lab checkpoints often, to exercise the loop
  min_gap_ms: {min_gap_ms}
  heartbeat_port: {heartbeat_port} # UDP, on the replication addresses
  heartbeat_interval_ms: {heartbeat_interval_ms}
  heartbeat_key: {heartbeat_key} # HMAC key, mode 0600, written by `lab up`
{primary_quorum}  failover_timeout_ms: {failover_timeout_ms}

log:
  level: info
{primary_disk}"""

_SECONDARY = """\
# coloproxy configuration for the one-machine lab: host S (role secondary) of the pair "{pair}".
#
# Generated by coloproxy/lab/configs.py from the lab topology's names; `coloproxy lab up`
# writes this text into {run_dir} and runs `coloproxy run -c` with it inside host S's
# namespace (before host P's). tests/test_lab.py checks that configs/lab-secondary.yaml
# stays equal to it.

pair:
  name: {pair}
  role: secondary

net:
  prefix: {prefix}
  # The SVM's tap, opened by QEMU in host S's namespace. It stays out of the LAN bridge while
  # the pair is protected and joins it at failover.
  guest_port: {guest_port}
  lan_bridge: {lan_bridge}
  replication:
    local: {secondary_address} # host S on the replication link
    remote: {primary_address} # host P
  underlay: {underlay}

control:
  socket: {secondary_socket}

metrics:
  # Inside host S's namespace: its own loopback, so the same port as host P's.
  listen: 127.0.0.1:9477

engine:
  qmp: {secondary_qmp} # the secondary QEMU's QMP monitor (the lab has its own, a second one)
  bring_up: true
  period_ms: {period_ms}
  min_gap_ms: {min_gap_ms}
  heartbeat_port: {heartbeat_port}
  heartbeat_interval_ms: {heartbeat_interval_ms}
  heartbeat_key: {heartbeat_key} # the same file as host P's
  # Host P's heartbeats silent this long: host S takes over (x-colo-lost-heartbeat, the
  # SVM's port into the LAN bridge, announce-self).
  failover_timeout_ms: {failover_timeout_ms}
{secondary_quorum}
log:
  level: info
{secondary_disk}"""


def disk_text(paths: LabPaths, role: str) -> str:
    """The disk section of ``role``'s host (host P: "primary")."""
    return _DISK.format(
        image=paths.disk_image(role),
        size=DISK_SIZE_MIB,
        active=paths.disk_active(role),
        hidden=paths.disk_hidden(role),
        nbd_port=NBD_PORT,
    )


def _fields(paths: LabPaths, two_host: bool = False, disk: bool = True) -> dict[str, object]:
    """What every template is filled with, host P first (the first bring-up's roles)."""

    def quorum(host: str) -> str:
        if two_host:
            return ""
        return _QUORUM.format(endpoints=etcd_endpoints(host), quorum_prefix=QUORUM_PREFIX)

    return {
        "primary_disk": disk_text(paths, "primary") if disk else "",
        "secondary_disk": disk_text(paths, "secondary") if disk else "",
        "primary_quorum": quorum("hp"),
        "secondary_quorum": quorum("hs"),
        "pair": PAIR_NAME,
        "prefix": NET_PREFIX,
        "run_dir": paths.run_dir,
        "guest_port": GUEST_PORT,
        "lan_bridge": LAN_BRIDGE,
        "underlay": REPLICATION,
        "primary_address": REPLICATION_IPV4["hp"],
        "secondary_address": REPLICATION_IPV4["hs"],
        "primary_socket": paths.control_socket("primary"),
        "secondary_socket": paths.control_socket("secondary"),
        "primary_qmp": paths.qmp_socket("primary"),
        "secondary_qmp": paths.qmp_socket("secondary"),
        "period_ms": PERIOD_MS,
        "min_gap_ms": MIN_GAP_MS,
        "migrate_uri": migrate_uri(),
        "heartbeat_port": HEARTBEAT_PORT,
        "heartbeat_interval_ms": HEARTBEAT_INTERVAL_MS,
        "failover_timeout_ms": FAILOVER_TIMEOUT_MS,
        "heartbeat_key": paths.heartbeat_key,
    }


def reprotect_config_text(paths: LabPaths, two_host: bool = False, disk: bool = True) -> str:
    """Host P's config after ``lab reprotect``: role secondary, its new QEMU waits for host S
    (now the primary) to migrate into it. Host P's socket and monitors keep their names."""
    fields = _fields(paths, two_host, disk) | {
        "secondary_quorum": _fields(paths, two_host)["primary_quorum"],
        "secondary_disk": disk_text(paths, "primary") if disk else "",
        "primary_address": REPLICATION_IPV4["hs"],
        "secondary_address": REPLICATION_IPV4["hp"],
        "secondary_socket": paths.control_socket("primary"),
        "secondary_qmp": paths.qmp_socket("primary"),
    }
    head = (
        f"# coloproxy configuration for the one-machine lab after `coloproxy lab reprotect`:"
        f' host P (role secondary) of the pair "{PAIR_NAME}"; host S is the primary now.\n'
        "# Generated by coloproxy/lab/configs.py (reprotect_config_text). The host names in"
        " the comments below\n# are the ones of the first bring-up: read P for S and S for P.\n"
    )
    return head + _SECONDARY.format(**fields)


def config_text(
    role: str, paths: LabPaths | None = None, two_host: bool = False, disk: bool = True
) -> str:
    """The config of ``role`` ("primary" or "secondary") for a lab in ``paths.run_dir``;
    ``two_host``: without the quorum (``lab up --two-host``); ``disk``: with the guest's
    disk (not ``lab up --no-disk``)."""
    template = {"primary": _PRIMARY, "secondary": _SECONDARY}[role]
    return template.format(**_fields(paths or LabPaths(), two_host, disk))


# The lab's --chardev mode (docs/chardev.md): host P's QEMU keeps its filters, coloproxy takes
# colo-compare's place on the same sockets (FILTER_PORTS).
_PRIMARY_CHARDEV = """\
# --chardev: QEMU's filters feed this daemon over colo-compare's sockets; no NFQUEUE, no tc.
chardev:
  primary_in: {{tcp: "127.0.0.1:{compare_primary}", server: false}} # QEMU's compare0
  secondary_in: {{tcp: "{primary_address}:{compare_secondary}", server: true}} # host S's red1
  outdev: {{tcp: "127.0.0.1:{out}", server: false}} # QEMU's compare_out (redire0's indev)
  reconnect_ms: 100
"""
_SECONDARY_CHARDEV = """\
  # --chardev: at failover, the redirectors to host P go (QEMU's COLO-FT.txt).
  failover_object_del: [f2, f1]
"""


def chardev_config_text(
    role: str, paths: LabPaths | None = None, two_host: bool = False, disk: bool = True
) -> str:
    """``config_text`` for the lab's ``--chardev`` mode: host P's daemon with a chardev
    section (its queues left out), host S's engine removing its redirectors at failover."""
    text = config_text(role, paths, two_host, disk)
    marker = "\n\nlog:\n"  # the engine section ends right before it, in both texts
    if role == "primary":
        block = _PRIMARY_CHARDEV.format(
            primary_address=REPLICATION_IPV4["hp"],
            compare_primary=FILTER_PORTS["compare_primary"],
            compare_secondary=FILTER_PORTS["compare_secondary"],
            out=FILTER_PORTS["out"],
        )
        return text.replace(marker, "\n\n" + block + "\nlog:\n", 1)
    return text.replace(marker, "\n" + _SECONDARY_CHARDEV + "\nlog:\n", 1)


def write_examples(directory: Path) -> list[Path]:
    """Write configs/lab.yaml and configs/lab-secondary.yaml (the default run directory)."""
    written = []
    for role, name in FILES.items():
        path = directory / name
        path.write_text(config_text(role))
        written.append(path)
    return written


if __name__ == "__main__":  # python3 -m coloproxy.lab.configs [DIR]: rewrite the examples
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parents[2] / "configs"
    for written_path in write_examples(target):
        print(written_path)
