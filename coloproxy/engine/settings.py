"""What the checkpoint engine needs from the config file (shell: it reads the key files).

:class:`EngineSettings` is what :class:`~coloproxy.engine.runner.EngineRunner` runs with, built
from the config by :meth:`EngineSettings.from_config` (or by tests); :class:`QuorumSettings`
the leader key's timings and where it lives (docs/engine.md, "Failover by quorum").
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from coloproxy.config import Config, ConfigError, QuorumService, read_key_file
from coloproxy.engine.disk import DiskSettings
from coloproxy.engine.leader import LeaderConfig
from coloproxy.engine.peer import HeartbeatPath
from coloproxy.engine.quorum import EtcdSettings
from coloproxy.role import Role


@dataclass(frozen=True, slots=True)
class QuorumSettings:
    """The leader key: its timings and where it lives."""

    leader: LeaderConfig
    etcd: EtcdSettings


@dataclass(frozen=True, slots=True)
class EngineSettings:
    """What the engine needs from the config (``from_config``), or built by tests."""

    pair: str
    role: Role
    qmp: str
    control_socket: Path
    heartbeat_paths: tuple[HeartbeatPath, ...]
    heartbeat_key: bytes  # HMAC-SHA256 key of the heartbeats (engine.heartbeat_key's file)
    migrate_uri: str | None = None
    bring_up: bool = True
    period_ms: int = 20000
    min_gap_ms: int = 100
    checkpoint_timeout_ms: int = 10000
    heartbeat_interval_ms: int = 50
    failover_timeout_ms: int = 300
    # QEMU objects deleted (object-del) when this host's QEMU leaves COLO to run alone: with
    # QEMU's own network filters, the redirectors to the lost host (QEMU's COLO-FT.txt).
    failover_object_del: tuple[str, ...] = ()
    quorum: QuorumSettings | None = None  # None: the two-host mode (labs only)
    disk: DiskSettings | None = None  # the guest's disk, replicated (engine/disk.py)

    @classmethod
    def from_config(cls, config: Config) -> EngineSettings | None:
        """None when the config names no QMP socket: no engine runs in the daemon."""
        engine = config.engine
        if engine.qmp is None:
            return None
        if engine.heartbeat_key is None:  # the config reader requires it with qmp
            raise ConfigError([f"{config.path}: engine.heartbeat_key is not set"])
        key = read_key_file(engine.heartbeat_key, "engine.heartbeat_key")
        paths = [
            HeartbeatPath(
                "replication",
                config.net.replication.local,
                config.net.replication.remote,
                engine.heartbeat_port,
            )
        ]
        if engine.lan_heartbeat is not None:
            paths.append(
                HeartbeatPath(
                    "lan",
                    engine.lan_heartbeat.local,
                    engine.lan_heartbeat.remote,
                    engine.heartbeat_port,
                )
            )
        return cls(
            pair=config.pair.name,
            role=config.pair.role,
            qmp=engine.qmp,
            control_socket=config.control.socket,
            heartbeat_paths=tuple(paths),
            heartbeat_key=key,
            migrate_uri=engine.migrate_uri,
            bring_up=engine.bring_up,
            period_ms=engine.period_ms,
            min_gap_ms=engine.min_gap_ms,
            checkpoint_timeout_ms=engine.checkpoint_timeout_ms,
            heartbeat_interval_ms=engine.heartbeat_interval_ms,
            failover_timeout_ms=engine.failover_timeout_ms,
            failover_object_del=engine.failover_object_del,
            quorum=_quorum_settings(config),
            disk=DiskSettings.from_config(config),
        )


def _quorum_settings(config: Config) -> QuorumSettings | None:
    quorum = config.engine.quorum
    if quorum is None or quorum.service is QuorumService.TWO_HOST:
        return None
    password = None
    if quorum.password_file is not None:
        secret = read_key_file(quorum.password_file, "engine.quorum.password_file", 1)
        password = secret.decode("utf-8", "replace")
    return QuorumSettings(
        leader=LeaderConfig(
            ttl=quorum.ttl_ms / 1000,
            renew=quorum.renew_ms / 1000,
            margin=quorum.margin_ms / 1000,
            retry=quorum.retry_ms / 1000,
        ),
        etcd=EtcdSettings(
            endpoints=tuple(
                f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
                for host, port in quorum.endpoints
            ),
            prefix=quorum.prefix,
            pair=config.pair.name,
            timeout=quorum.timeout_ms / 1000,
            ca_file=Path(quorum.ca_file) if quorum.ca_file else None,
            cert_file=Path(quorum.cert_file) if quorum.cert_file else None,
            key_file=Path(quorum.key_file) if quorum.key_file else None,
            user=quorum.user,
            password=password,
        ),
    )


__all__ = ["EngineSettings", "QuorumSettings"]
