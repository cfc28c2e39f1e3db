"""The files a configuration names, read or checked: key files (secrets), and what
``check-config`` checks beyond the text (shell)."""

from __future__ import annotations

import os
import stat
from typing import Final

from coloproxy.config.model import Config
from coloproxy.config.problems import ConfigError
from coloproxy.engine.heartbeat import MIN_HEARTBEAT_KEY_BYTES
from coloproxy.role import Role

# A key file holds a secret, not a document: bound what is read.
MAX_KEY_BYTES: Final = 4096


def read_key_file(path: str, key: str, least: int = MIN_HEARTBEAT_KEY_BYTES) -> bytes:
    """The secret in ``path`` (config key ``key``): its bytes, a final newline stripped.
    Refused (:class:`ConfigError`, one line saying why) unless it is a regular file that no
    group or other user may read or write (mode 0600 or 0400), and of at least
    ``least`` bytes."""

    def bad(why: str) -> ConfigError:
        return ConfigError([f"{path} ({key}): {why}"])

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        raise bad(f"cannot read: {exc.strerror or exc}") from exc
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise bad("not a regular file")
        if info.st_mode & 0o077:
            raise bad(
                f"mode {stat.S_IMODE(info.st_mode):04o} lets other users read or change the"
                f" key; chmod 600 {path}"
            )
        data = os.read(fd, MAX_KEY_BYTES + 1)
    except OSError as exc:
        raise bad(f"cannot read: {exc.strerror or exc}") from exc
    finally:
        os.close(fd)
    if len(data) > MAX_KEY_BYTES:
        raise bad(f"more than {MAX_KEY_BYTES} bytes; a key file holds one secret")
    secret = data[:-1] if data.endswith(b"\n") else data
    if len(secret) < least:
        raise bad(
            f"{len(secret)} bytes; at least {least} (e.g. head -c 32 /dev/urandom | base64 >"
            f" {path})"
        )
    return secret


def check_files(config: Config) -> list[str]:
    """What ``check-config`` checks beyond the text: the files the config names that the
    daemon reads at start (secrets: present, private, long enough; certificates: present)."""
    problems: list[str] = []
    secrets = [(config.engine.heartbeat_key, "engine.heartbeat_key", MIN_HEARTBEAT_KEY_BYTES)]
    quorum = config.engine.quorum
    if quorum is not None:
        secrets += [
            (quorum.key_file, "engine.quorum.key_file", 1),
            (quorum.password_file, "engine.quorum.password_file", 1),
        ]
        for path, name in ((quorum.ca_file, "ca_file"), (quorum.cert_file, "cert_file")):
            if path is not None and not os.path.isfile(path):
                problems.append(f"{path} (engine.quorum.{name}): not a readable file")
    for path, name, least in secrets:
        if path is None:
            continue
        try:
            read_key_file(path, name, least)
        except ConfigError as exc:
            problems.extend(exc.problems)
    disk = config.disk
    if disk is not None:
        # The QEMU of this host opens these when it starts: the image always, the active and
        # hidden disks when it starts as the secondary.
        wanted = [(disk.image, "disk.image")]
        if config.pair.role is Role.SECONDARY:
            wanted += [(disk.active, "disk.active"), (disk.hidden, "disk.hidden")]
        for path, name in wanted:
            if not os.path.exists(path):
                problems.append(f"{path} ({name}): does not exist")
    return problems


def describe(config: Config) -> str:
    """The one line ``check-config`` prints for a good file."""
    return f"{config.path}: ok (pair {config.pair.name}, role {config.pair.role})"
