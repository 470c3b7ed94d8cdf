"""The whole configuration file: every section, and the checks between sections."""

from __future__ import annotations

import importlib.util
from typing import Any

from pydantic import BaseModel, model_validator

from dicom_node.errors import ConfigError
from dicom_node.settings.base import FROZEN, Name
from dicom_node.settings.destinations import Destination
from dicom_node.settings.models import ModelSpec
from dicom_node.settings.node import NodeSettings
from dicom_node.settings.operations import HttpSettings, LoggingSettings, SendSettings, WorkersSettings
from dicom_node.settings.outputs import OutputsSettings
from dicom_node.settings.rules import MULTI_INPUT_MODEL_TYPES, RuleSettings
from dicom_node.settings.storage import CompletionSettings, StorageSettings
from dicom_node.settings.yaml_lines import dotted


class Settings(BaseModel):
    """The whole configuration file.

    Cross references are checked after the sections themselves are valid: rule
    names are unique and every rule's ``run`` / ``send_to`` names an existing
    model / destination.  Such problems raise :class:`ConfigError` directly
    (not pydantic's ``ValidationError``), naming each key.
    """

    model_config = FROZEN

    node: NodeSettings = NodeSettings()
    storage: StorageSettings = StorageSettings()
    completion: CompletionSettings = CompletionSettings()
    destinations: dict[Name, Destination] = {}
    models: dict[Name, ModelSpec] = {}
    outputs: OutputsSettings = OutputsSettings()
    send: SendSettings = SendSettings()
    workers: WorkersSettings = WorkersSettings()
    rules: tuple[RuleSettings, ...] = ()
    http: HttpSettings = HttpSettings()
    logging: LoggingSettings = LoggingSettings()

    @model_validator(mode="after")
    def _references(self) -> Settings:
        problems = self.reference_problems()
        if problems:
            raise _ReferenceError(problems)
        return self

    def reference_problems(self) -> list[tuple[tuple[str | int, ...], str]]:
        """Problems between sections, as ``(key path, reason)`` pairs (empty when consistent)."""
        problems: list[tuple[tuple[str | int, ...], str]] = _ray_problems(self)
        first_rule: dict[str, int] = {}
        for i, rule in enumerate(self.rules):
            if rule.name in first_rule:
                problems.append(
                    (("rules", i, "name"), f"duplicate rule name {rule.name!r} (also rules[{first_rule[rule.name]}])")
                )
            first_rule.setdefault(rule.name, i)
            for j, model in enumerate(rule.run):
                if model not in self.models:
                    known = ", ".join(sorted(self.models)) or "none defined"
                    problems.append(
                        (("rules", i, "run", j), f"rule {rule.name!r} runs unknown model {model!r} (models: {known})")
                    )
                elif rule.study is not None:
                    problems.extend((("rules", i, "run", j), p) for p in _channel_problems(rule, model,
                                                                                          self.models[model]))
            for j, dest in enumerate(rule.send_to):
                if dest not in self.destinations:
                    known = ", ".join(sorted(self.destinations)) or "none defined"
                    problems.append(
                        (
                            ("rules", i, "send_to", j),
                            f"rule {rule.name!r} sends to unknown destination {dest!r} (destinations: {known})",
                        )
                    )
        for name, spec in self.models.items():
            if spec.type != "chain":
                continue
            for key in ("first", "then"):
                target = self.models.get(getattr(spec, key))
                if target is None:
                    problems.append((("models", name, key), f"chain {name!r} uses unknown model "
                                     f"{getattr(spec, key)!r} (models: {', '.join(sorted(self.models))})"))
                elif target.type == "chain":
                    problems.append((("models", name, key), f"chain {name!r}: {getattr(spec, key)!r} is itself "
                                     "a chain; chains take plain models"))
                elif key == "first" and getattr(target, "task", "segmentation") != "segmentation":
                    problems.append((("models", name, key), f"chain {name!r}: first model {spec.first!r} must "
                                     "be a segmentation model"))
        for name, spec in self.models.items():
            if spec.type != "merge":
                continue
            for j, part in enumerate(spec.models):
                target = self.models.get(part)
                if target is None:
                    problems.append((("models", name, "models", j), f"merge {name!r} uses unknown model {part!r} "
                                     f"(models: {', '.join(sorted(self.models))})"))
                elif target.type in ("merge", "chain"):
                    problems.append((("models", name, "models", j), f"merge {name!r}: {part!r} is a {target.type}; "
                                     "merge takes plain segmentation models"))
                elif getattr(target, "task", "segmentation") != "segmentation":
                    problems.append((("models", name, "models", j), f"merge {name!r}: {part!r} is not a "
                                     "segmentation model"))
        if self.http.enabled and self.http.port == self.node.port and (
            self.http.host == self.node.host or {"0.0.0.0", "::"} & {self.http.host, self.node.host}
        ):
            problems.append((("http", "port"), f"http.port {self.http.port} is the DICOM port node.port"))
        return problems

    def channels_for(self, rule: RuleSettings | None, model: str) -> tuple[str, ...]:
        """The study roles that become ``model``'s input channels under ``rule`` (the rule's, else the model's)."""
        if rule is not None and rule.channels:
            return rule.channels
        return tuple(getattr(self.models.get(model), "channels", ()) or ())

    def warnings(self) -> list[str]:
        """Valid but probably unintended settings, for ``check-config`` and start-up logs."""
        notes: list[str] = []
        if not self.node.allowed_peers:
            notes.append("node.allowed_peers is empty: associations from any peer are accepted")
        if not self.rules:
            notes.append("no rules: received series are stored but no model runs")
        for rule in self.rules:
            if not rule.send_to:
                notes.append(f"rule {rule.name!r} has no send_to: its results stay in the spool")
            if not rule.when and not rule.default and rule.study is None:
                notes.append(f"rule {rule.name!r} has an empty 'when': it matches every series")
        used_models = {m for rule in self.rules for m in rule.run}
        used_dests = {d for rule in self.rules for d in rule.send_to}
        notes.extend(f"model {m!r} is not used by any rule" for m in self.models if m not in used_models)
        notes.extend(f"destination {d!r} is not used by any rule" for d in self.destinations if d not in used_dests)
        notes.extend(f"destination {d!r} sends credentials over plain http: use https" for d, dest in
                     self.destinations.items() if dest.type == "dicomweb" and dest.auth and dest.url.startswith("http:"))
        notes.extend(f"destination {d!r} does not verify the server's TLS certificate (verify_tls: false)" for d, dest
                     in self.destinations.items() if dest.type == "dicomweb" and not dest.verify_tls)
        return notes


class _ReferenceError(ConfigError):
    """Cross-reference problems; propagates through pydantic because it is not a ``ValueError``."""

    def __init__(self, problems: list[tuple[tuple[str | int, ...], str]]) -> None:
        super().__init__("\n".join(f"{dotted(loc)}: {msg}" for loc, msg in problems))
        self.problems = problems


def _channel_problems(rule: RuleSettings, name: str, model: Any) -> list[str]:
    """Why a study rule cannot give its series to ``model`` (channels unknown, or a model that takes one series)."""
    assert rule.study is not None
    roles = list(rule.study.series)
    channels = rule.channels or tuple(getattr(model, "channels", ()) or ())
    if channels:
        if model.type in ("builtin", "chain"):
            return [f"study rule {rule.name!r}: model {name!r} ({model.type}) takes one series, not channels"]
        unknown = [c for c in channels if c not in roles]
        if unknown:
            return [f"study rule {rule.name!r}: channels {unknown} of model {name!r} are not series of the rule "
                    f"(study.series: {', '.join(roles)})"]
        return []
    if len(roles) > 1 and model.type not in MULTI_INPUT_MODEL_TYPES:
        return [f"study rule {rule.name!r} gives model {name!r} {len(roles)} series ({', '.join(roles)}) but a "
                f"{model.type} model takes one series; list them as its input channels (channels: "
                f"[{', '.join(roles)}]) or use a type: python model"]
    return []


def _ray_problems(settings: Settings) -> list[tuple[tuple[str | int, ...], str]]:
    """``workers.engine: ray`` needs the extra installed and an address; pools name configured models."""
    ray = settings.workers.ray
    problems: list[tuple[tuple[str | int, ...], str]] = [
        (("workers", "ray", "pools", name), f"pool for unknown model {name!r} (models: "
                                            f"{', '.join(sorted(settings.models)) or 'none defined'})")
        for name in ray.pools if name not in settings.models]
    if settings.workers.engine != "ray":
        return problems
    if importlib.util.find_spec("ray") is None:
        problems.append((("workers", "engine"), "engine ray needs Ray, an optional extra that is not installed: "
                                                ".venv/bin/pip install -c constraints.txt -e '.[ray]' in the clone "
                                                "(or pip install 'dicom-node[ray]')"))
    if ray.address is None:
        problems.append((("workers", "ray", "address"), "engine ray needs the address of the cluster's head "
                                                        "(HOST:PORT, as `ray start --head` printed it)"))
    return problems
