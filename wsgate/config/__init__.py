"""The YAML configuration: schema, units ("30s", "16MiB") and validation with key paths.

A pure core package: it reads a file and returns a frozen pydantic model, or
raises ``ConfigError``. It never logs and never exits; ``cli`` decides what a
bad config means for the process. Its modules, each importing only those
before it: ``units`` (durations, sizes, rates, addresses), ``validators``
(one per kind of value), ``schema`` (the models), ``validation`` (pydantic's
errors as key paths) and ``loading`` (YAML, ``${VAR}`` substitution, the admin
token).
"""

from .loading import dump_config_data, load_config, load_config_data, read_admin_token, substitute_environment
from .schema import (
    Admin,
    Backend,
    BackendTls,
    Config,
    Discovery,
    FlowControl,
    FrameRate,
    HealthCheck,
    Heartbeat,
    Limits,
    Listener,
    Log,
    Match,
    NewConnections,
    PassiveEjection,
    Rebalance,
    Route,
    Shutdown,
    SniCertificate,
    Timeouts,
    Tls,
    keep_restart_settings,
)
from .units import format_host_port, parse_duration, parse_host_port, parse_network, parse_rate, parse_size
from .validation import parse_config
from .validators import Duration, Size

__all__ = [
    "Admin",
    "Backend",
    "BackendTls",
    "Config",
    "Discovery",
    "Duration",
    "FlowControl",
    "FrameRate",
    "HealthCheck",
    "Heartbeat",
    "Limits",
    "Listener",
    "Log",
    "Match",
    "NewConnections",
    "PassiveEjection",
    "Rebalance",
    "Route",
    "Shutdown",
    "Size",
    "SniCertificate",
    "Timeouts",
    "Tls",
    "dump_config_data",
    "format_host_port",
    "keep_restart_settings",
    "load_config",
    "load_config_data",
    "parse_config",
    "parse_duration",
    "parse_host_port",
    "parse_network",
    "parse_rate",
    "parse_size",
    "read_admin_token",
    "substitute_environment",
]
