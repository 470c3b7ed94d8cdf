"""Reading the configuration: a file or text to a validated :class:`~dicom_node.settings.root.Settings`."""

from __future__ import annotations

import logging
from importlib import resources
from pathlib import Path

from pydantic import ValidationError

from dicom_node.errors import ConfigError
from dicom_node.rules.keys import OPERATORS
from dicom_node.settings.root import Settings, _ReferenceError
from dicom_node.settings.yaml_lines import describe, duplicate_keys, format_problem, parse_yaml

logger = logging.getLogger(__name__)

def load_settings(path: Path) -> Settings:
    """Read and validate a configuration file.

    Parameters
    ----------
    path:
        The YAML file (UTF-8, a BOM is tolerated).

    Returns
    -------
    Settings
        The validated, frozen configuration.

    Raises
    ------
    ConfigError
        The file cannot be read, is not YAML, is empty, or has invalid keys or
        values; the message has one ``FILE:LINE: KEY.PATH: reason`` line per problem.
    """
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the configuration file: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: the configuration file is not UTF-8 text ({exc.reason})") from exc
    return load_settings_text(text, source=str(path))


def load_settings_text(text: str, source: str = "<string>") -> Settings:
    """Validate configuration given as YAML text.

    Parameters
    ----------
    text:
        The YAML document.
    source:
        Name used in error messages (usually the file path).

    Returns
    -------
    Settings
        The validated, frozen configuration.

    Raises
    ------
    ConfigError
        As :func:`load_settings`.
    """
    root, data = parse_yaml(text, source)
    if root is None:
        raise ConfigError(f"{source}: the configuration is empty; start from config/node.example.yaml")
    if not isinstance(data, dict):
        raise ConfigError(f"{source}:{root.start_mark.line + 1}: the configuration must be a mapping of sections")
    duplicates = duplicate_keys(root)
    if duplicates:
        raise ConfigError("\n".join(f"{source}:{line}: {msg}" for line, msg in duplicates))
    try:
        settings = Settings.model_validate(data)
    except ValidationError as exc:
        lines = [describe(error, root, source, OPERATORS) for error in exc.errors()]
        raise ConfigError("\n".join(dict.fromkeys(lines))) from None
    except _ReferenceError as exc:
        lines = [format_problem(root, source, loc, msg) for loc, msg in exc.problems]
        raise ConfigError("\n".join(lines)) from None
    logger.debug("Configuration %s: %d models, %d rules", source, len(settings.models), len(settings.rules))
    return settings


def default_config_text() -> str:
    """The embedded default configuration (``dicom_node/default_config.yaml``) as text."""
    return resources.files("dicom_node").joinpath("default_config.yaml").read_text(encoding="utf-8")


def default_settings() -> Settings:
    """The embedded default: AE ``DICOMNODE`` on port 11112, state in ``./var``, builtin models, example rule.

    Raises
    ------
    ConfigError
        Only if the packaged default is broken (a packaging bug).
    """
    return load_settings_text(default_config_text(), source="<embedded default_config.yaml>")
