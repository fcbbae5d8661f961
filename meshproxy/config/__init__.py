"""Configuration: strict YAML into frozen dataclasses (the marble config lives here)."""

from meshproxy.config._strict import Node, load_file, parse_document, parse_duration

__all__ = ["Node", "load_file", "parse_document", "parse_duration"]

from meshproxy.config._marble import (
    Address,
    AttestationConfig,
    CoordinatorConfig,
    InboundConfig,
    LogConfig,
    MarbleConfig,
    MarbleSection,
    OutboundConfig,
    load_marble_config,
    parse_address,
    parse_marble_config,
)

__all__ += [
    "Address",
    "AttestationConfig",
    "CoordinatorConfig",
    "InboundConfig",
    "LogConfig",
    "MarbleConfig",
    "MarbleSection",
    "OutboundConfig",
    "load_marble_config",
    "parse_address",
    "parse_marble_config",
]
