"""The node's configuration: pydantic models of the YAML file, loading and validation.

Every model is frozen and forbids unknown keys, so a typo is an error at start-up,
never a silently ignored setting.  :func:`load_settings` and
:func:`load_settings_text` turn every problem into one :class:`~dicom_node.errors.ConfigError`
whose message has one line per problem::

    node.yaml:14: node.ae_title: AE title must be at most 16 characters (got 18)

naming the file, the YAML line of the key, the dotted key path and the reason.

Every section and every key has a default (see ``dicom_node/default_config.yaml``
and ``config/node.example.yaml``, which documents each key), except the keys that
identify a peer (a destination's AE title, host and port) and a rule's ``name``,
``when`` and ``run``.  A file that parses to nothing (empty, only comments) is an
error; ``{}`` is a valid file that runs no model.

Relative paths (``storage.path``, a python model's ``path``) are relative to the
current working directory of the process, not to the configuration file; the
systemd unit sets ``WorkingDirectory``.

One module per section: :mod:`~dicom_node.settings.node` (node and TLS),
:mod:`~dicom_node.settings.storage` (storage, completion),
:mod:`~dicom_node.settings.destinations`, :mod:`~dicom_node.settings.models`,
:mod:`~dicom_node.settings.outputs`, :mod:`~dicom_node.settings.rules`,
:mod:`~dicom_node.settings.operations` (send, workers, http, logging); the root
model in :mod:`~dicom_node.settings.root`, reading and error lines in
:mod:`~dicom_node.settings.loading` and :mod:`~dicom_node.settings.yaml_lines`.
"""

from __future__ import annotations

from dicom_node.rules.keys import DERIVED_FACTS, GROUP_KEYS, OPERATORS
from dicom_node.settings.destinations import Destination, DicomwebAuth, DicomwebDestination, DimseDestination
from dicom_node.settings.loading import default_config_text, default_settings, load_settings, load_settings_text
from dicom_node.settings.models import (
    BUILTIN_MODEL_NAMES,
    BuiltinModel,
    ChainModel,
    CodeSettings,
    LabelSettings,
    MergeModel,
    ModelSpec,
    MonaiBundleModel,
    NnunetModel,
    PreprocessingSettings,
    PythonModel,
    TorchscriptModel,
)
from dicom_node.settings.node import NodeSettings, PeerSettings, TlsSettings
from dicom_node.settings.operations import HttpSettings, LoggingSettings, SendSettings, WorkersSettings
from dicom_node.settings.outputs import OutputSeriesSettings, OutputsSettings
from dicom_node.settings.root import Settings
from dicom_node.settings.rules import (
    MULTI_INPUT_MODEL_TYPES,
    PRIORITY_LEVELS,
    Condition,
    RuleSettings,
    StudyRuleSettings,
)
from dicom_node.settings.storage import CFindPeerSettings, CompletionSettings, StorageSettings

__all__ = [
    "BUILTIN_MODEL_NAMES",
    "DERIVED_FACTS",
    "GROUP_KEYS",
    "MULTI_INPUT_MODEL_TYPES",
    "OPERATORS",
    "PRIORITY_LEVELS",
    "BuiltinModel",
    "CFindPeerSettings",
    "ChainModel",
    "CodeSettings",
    "CompletionSettings",
    "Condition",
    "Destination",
    "DicomwebAuth",
    "DicomwebDestination",
    "DimseDestination",
    "HttpSettings",
    "LabelSettings",
    "LoggingSettings",
    "MergeModel",
    "ModelSpec",
    "NnunetModel",
    "MonaiBundleModel",
    "NodeSettings",
    "OutputSeriesSettings",
    "OutputsSettings",
    "PeerSettings",
    "PreprocessingSettings",
    "PythonModel",
    "RuleSettings",
    "SendSettings",
    "Settings",
    "StorageSettings",
    "StudyRuleSettings",
    "TlsSettings",
    "TorchscriptModel",
    "WorkersSettings",
    "default_config_text",
    "default_settings",
    "load_settings",
    "load_settings_text",
]
