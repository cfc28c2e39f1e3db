"""The YAML configuration of one proxy: one file per host pair and role (shell).

One module per concept:

=============  ==============================================================================
``model``      the typed configuration: frozen dataclasses per section, the enums of values
``problems``   how problems are worded: :class:`ConfigError` (one line per problem), values shown
``rules``      the value rules: a YAML value in, a typed value out or "expected ..., got ..."
``schema``     the key tables of every section (rule, default), the list bounds
``reader``     the bounded read: file -> YAML node tree with lines -> values and problems
``build``      the checks across keys and sections, the dataclasses; ``load_config``
``build_*``    the sections with checks of their own: ``chardev``; ``engine``, quorum, disk
``files``      the files a configuration names: key files, ``check-config``'s file checks
=============  ==============================================================================

docs/configuration.md describes every key; configs/ holds commented examples.
"""

from coloproxy.config.build import load_config, parse_config
from coloproxy.config.files import check_files, describe, read_key_file
from coloproxy.config.model import (
    ChardevConfig,
    ChardevSocket,
    Config,
    ControlConfig,
    DiskConfig,
    DiskFormat,
    EngineConfig,
    LogConfig,
    LogLevel,
    MetricsConfig,
    NetConfig,
    PairConfig,
    QueuesConfig,
    QuorumConfig,
    QuorumService,
    ReplicationConfig,
    Transport,
)
from coloproxy.config.problems import ConfigError

__all__ = [
    "ChardevConfig",
    "ChardevSocket",
    "Config",
    "ConfigError",
    "ControlConfig",
    "DiskConfig",
    "DiskFormat",
    "EngineConfig",
    "LogConfig",
    "LogLevel",
    "MetricsConfig",
    "NetConfig",
    "PairConfig",
    "QueuesConfig",
    "QuorumConfig",
    "QuorumService",
    "ReplicationConfig",
    "Transport",
    "check_files",
    "describe",
    "load_config",
    "parse_config",
    "read_key_file",
]
