"""Configuration: typed sections (`schema.py`) loaded from YAML plus dotted overrides (`loader.py`)."""

from megagym.config.loader import ConfigError, apply_overrides, build, load, read_yaml, redacted, to_dict

__all__ = ["ConfigError", "apply_overrides", "build", "load", "read_yaml", "redacted", "to_dict"]
