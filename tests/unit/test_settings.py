"""Configuration loading: the shipped files load, and every bad file names the key, line and reason."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

from dicom_node.domain import OutputKind
from dicom_node.errors import ConfigError
from dicom_node.settings import (
    Condition,
    PeerSettings,
    RuleSettings,
    Settings,
    default_config_text,
    default_settings,
    load_settings,
    load_settings_text,
)

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "config" / "node.example.yaml"

# A valid base the bad cases below change one thing in.
BASE = """\
node:
  ae_title: DICOMNODE
  port: 11112
destinations:
  pacs: {ae_title: PACS, host: 127.0.0.1, port: 4242}
models:
  lungs: {type: builtin, name: lungs-ct}
rules:
  - name: chest-ct
    when:
      Modality: CT
      SliceThickness: {max: 3.0}
    run: [lungs]
    send_to: [pacs]
"""


def problem(text: str) -> str:
    """The ConfigError message for ``text`` (fails the test if it loads)."""
    with pytest.raises(ConfigError) as info:
        load_settings_text(textwrap.dedent(text), source="node.yaml")
    return str(info.value)


def assert_problem(message: str, line: int, key: str, reason: str) -> None:
    """``message`` has a line ``node.yaml:LINE: KEY: ...REASON...``."""
    pattern = rf"^node\.yaml:{line}: {re.escape(key)}: .*{re.escape(reason)}"
    assert re.search(pattern, message, re.MULTILINE), f"expected line {line}, key {key!r}, {reason!r} in:\n{message}"


# --------------------------------------------------------------------------- valid files


def test_base_loads_with_defaults_filled_in() -> None:
    settings = load_settings_text(BASE)
    assert settings.node.ae_title == "DICOMNODE"
    assert settings.node.max_pdu_bytes == 131072
    assert settings.completion.quiet_seconds == 30
    assert settings.destinations["pacs"].type == "dimse"
    assert settings.destinations["pacs"].resolve_calling_ae(settings.node.ae_title) == "DICOMNODE"
    rule = settings.rules[0]
    assert rule.outputs == (OutputKind.SEG, OutputKind.SR)
    assert rule.when["Modality"] == Condition(equals="CT")
    assert rule.when["SliceThickness"].max == 3.0


def test_example_file_loads_and_uses_every_section() -> None:
    assert EXAMPLE.is_file(), f"{EXAMPLE} is missing"
    settings = load_settings(EXAMPLE)
    data_keys = set(Settings.model_fields)
    text = EXAMPLE.read_text(encoding="utf-8")
    missing = [key for key in data_keys if not re.search(rf"^{key}:", text, re.MULTILINE)]
    assert missing == [], f"sections not documented in the example: {missing}"
    assert len(settings.rules) == 2
    assert settings.node.allowed_peers, "the example shows allowed_peers"
    assert "pacs" in settings.destinations
    assert settings.models["lungs"].type == "builtin"
    assert "type: python" in text, "the example shows a python model (commented out)"
    assert settings.warnings() == []


def test_example_documents_every_key_of_every_section() -> None:
    text = EXAMPLE.read_text(encoding="utf-8")
    settings = load_settings(EXAMPLE)
    for section in ("node", "storage", "completion", "outputs", "send", "workers", "http", "logging"):
        for key in type(getattr(settings, section)).model_fields:
            assert re.search(rf"^\s+#?\s*{key}:", text, re.MULTILINE), f"{section}.{key} not in the example"
    for key in ("ae_title", "host", "port", "calling_ae_title", "timeout_s"):
        assert re.search(rf"^\s+{key}:", text, re.MULTILINE), f"destinations.*.{key} not in the example"
    for key in ("callable", "path", "task", "version", "labels", "classes", "threshold", "device"):
        assert re.search(rf"^\s+#\s+{key}\b", text, re.MULTILINE), f"python model key {key} not documented"


def test_default_settings_match_the_documented_embedded_default() -> None:
    settings = default_settings()
    assert settings.node.ae_title == "DICOMNODE"
    assert settings.node.port == 11112
    assert settings.storage.path == Path("./var")
    assert settings.models["lungs"].type == "builtin"
    assert [r.name for r in settings.rules] == ["chest-ct"]
    assert settings.rules[0].send_to == ()
    assert settings.destinations == {}
    assert "lungs-ct" in default_config_text()


def test_load_settings_reads_a_file(tmp_path: Path) -> None:
    path = tmp_path / "node.yaml"
    path.write_text(BASE, encoding="utf-8")
    assert load_settings(path).rules[0].name == "chest-ct"


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"
    with pytest.raises(ConfigError, match="absent.yaml: cannot read"):
        load_settings(path)


def test_ae_title_is_stripped_and_numbers_are_accepted() -> None:
    settings = load_settings_text(
        "node: {ae_title: '  NODE1  '}\ndestinations: {p: {ae_title: 1234, host: pacs.local, port: 104}}\n"
    )
    assert settings.node.ae_title == "NODE1"
    assert settings.destinations["p"].ae_title == "1234"


def test_settings_are_frozen() -> None:
    settings = load_settings_text(BASE)
    with pytest.raises(ValueError, match="frozen"):
        settings.node.port = 1  # type: ignore[misc]


def test_conditions_shorthands() -> None:
    extra = "\n      BodyPartExamined: [CHEST, LUNG]\n      SeriesDescription: {regex: '(?i)lung'}"
    text = BASE.replace("Modality: CT", "Modality: CT" + extra)
    when = load_settings_text(text).rules[0].when
    assert when["BodyPartExamined"].in_ == ("CHEST", "LUNG")
    assert when["SeriesDescription"].regex is not None
    assert when["SeriesDescription"].regex.search("LUNG 1mm")


def test_derived_facts_are_valid_keys() -> None:
    text = BASE.replace("Modality: CT", "instance_count: {min: 20}\n      calling_ae: PACS")
    when = load_settings_text(text).rules[0].when
    assert when["instance_count"].min == 20
    assert when["calling_ae"].equals == "PACS"


def test_uid_root_gets_a_trailing_dot() -> None:
    assert load_settings_text("outputs: {uid_root: '1.2.826.0.1.3680043.9.7433'}\n").outputs.uid_root.endswith("7433.")


def test_allowed_peer_matching() -> None:
    settings = load_settings_text("node:\n  allowed_peers:\n    - {ae_title: PACS, host: 10.0.0.0/24}\n")
    peer = settings.node.allowed_peers[0]
    assert isinstance(peer, PeerSettings)
    assert peer.matches("PACS", "10.0.0.7")
    assert peer.matches("PACS ", "::ffff:10.0.0.7")
    assert not peer.matches("PACS", "10.0.1.7")
    assert not peer.matches("OTHER", "10.0.0.7")
    assert settings.node.peer_allowed("PACS", "10.0.0.9")
    assert not settings.node.peer_allowed("X", "10.0.0.9")
    assert default_settings().node.peer_allowed("ANY", "192.0.2.1"), "empty list accepts all"


def test_programmatic_settings_check_references() -> None:
    rule = RuleSettings(name="r", when={}, run=("nope",))
    with pytest.raises(ConfigError, match=r"rules\[0\]\.run\[0\]: rule 'r' runs unknown model 'nope'"):
        Settings(rules=(rule,))


# --------------------------------------------------------------------------- bad files


def test_ae_title_too_long() -> None:
    message = problem(BASE.replace("ae_title: DICOMNODE", "ae_title: ABCDEFGHIJKLMNOPQR"))
    assert_problem(message, 2, "node.ae_title", "AE title must be at most 16 characters (got 18)")


def test_ae_title_with_backslash() -> None:
    message = problem(BASE.replace("ae_title: DICOMNODE", "ae_title: 'DICOM\\NODE'"))
    assert_problem(message, 2, "node.ae_title", "must not contain a backslash")


def test_ae_title_all_spaces() -> None:
    message = problem(BASE.replace("ae_title: DICOMNODE", "ae_title: '   '"))
    assert_problem(message, 2, "node.ae_title", "must not be empty or all spaces")


@pytest.mark.parametrize(
    ("port", "reason"), [("0", "greater than or equal to 1"), ("70000", "less than or equal to 65535")]
)
def test_port_out_of_range(port: str, reason: str) -> None:
    message = problem(BASE.replace("port: 11112", f"port: {port}"))
    assert_problem(message, 3, "node.port", reason)
    assert f"(got {port})" in message


def test_destination_port_out_of_range_is_located_inside_the_flow_mapping() -> None:
    message = problem(BASE.replace("port: 4242", "port: 0"))
    assert_problem(message, 5, "destinations.pacs.port", "greater than or equal to 1")


def test_rule_naming_missing_model() -> None:
    message = problem(BASE.replace("run: [lungs]", "run: [lungs, liver]"))
    assert_problem(message, 13, "rules[0].run[1]", "rule 'chest-ct' runs unknown model 'liver'")


def test_rule_naming_missing_destination() -> None:
    message = problem(BASE.replace("send_to: [pacs]", "send_to:\n      - archive"))
    assert_problem(message, 15, "rules[0].send_to[0]", "rule 'chest-ct' sends to unknown destination 'archive'")


def test_unknown_top_level_key() -> None:
    message = problem(BASE + "nodes: {}\n")
    assert_problem(message, 15, "nodes", "unknown key")


def test_unknown_nested_key() -> None:
    message = problem(BASE.replace("  port: 11112\n", "  port: 11112\n  foo: 1\n"))
    assert_problem(message, 4, "node.foo", "unknown key")


def test_unknown_operator() -> None:
    message = problem(BASE.replace("SliceThickness: {max: 3.0}", "SliceThickness:\n        bogus_op: 3"))
    assert_problem(message, 13, "rules[0].when.SliceThickness.bogus_op", "unknown operator")
    assert "exists, absent, equals, iequals, in, regex, contains, min, max, not" in message


def test_unknown_dicom_keyword_suggests_the_right_one() -> None:
    message = problem(BASE.replace("Modality: CT", "modality: CT"))
    assert_problem(message, 11, "rules[0].when.modality", "unknown DICOM keyword 'modality'")
    assert "did you mean 'Modality'" in message


def test_sequence_keyword_is_refused() -> None:
    message = problem(BASE.replace("Modality: CT", "ReferencedImageSequence: x"))
    assert_problem(message, 11, "rules[0].when.ReferencedImageSequence", "has VR SQ")


def test_invalid_regex() -> None:
    message = problem(BASE.replace("SliceThickness: {max: 3.0}", "SeriesDescription:\n        regex: '(lung'"))
    assert_problem(message, 13, "rules[0].when.SeriesDescription.regex", "invalid regular expression '(lung'")


def test_min_greater_than_max() -> None:
    message = problem(BASE.replace("{max: 3.0}", "{min: 5, max: 3.0}"))
    assert_problem(message, 12, "rules[0].when.SliceThickness", "min (5.0) is greater than max (3.0)")


def test_yaml_boolean_condition_value_is_explained() -> None:
    message = problem(BASE.replace("Modality: CT", "Modality: NO"))
    assert_problem(message, 11, "rules[0].when.Modality", "quote the value")


def test_duplicate_rule_names() -> None:
    message = problem(BASE + "  - name: chest-ct\n    when: {}\n    run: [lungs]\n")
    assert_problem(message, 15, "rules[1].name", "duplicate rule name 'chest-ct'")


def test_missing_required_key() -> None:
    message = problem(BASE.replace("host: 127.0.0.1, ", ""))
    assert_problem(message, 5, "destinations.pacs.host", "required key is missing")


def test_unknown_model_type() -> None:
    message = problem(BASE.replace("type: builtin", "type: onnx"))
    assert_problem(message, 7, "models.lungs.type", "unknown type 'onnx'")


def test_python_model_errors_are_located() -> None:
    text = BASE.replace(
        "  lungs: {type: builtin, name: lungs-ct}\n",
        "  lungs: {type: builtin, name: lungs-ct}\n"
        "  liver:\n"
        "    type: python\n"
        "    callable: liver_model.segment\n"
        "    version: 1.10\n"
        "    labels:\n"
        "      - {value: 1, name: Liver, snomed: {value: 10200004, meaning: Liver}, color: [1, 2, 300]}\n",
    )
    message = problem(text)
    assert_problem(message, 10, "models.liver.callable", "package.module:function")
    assert_problem(message, 11, "models.liver.version", "quote the value")
    assert_problem(message, 13, "models.liver.labels[0].color[2]", "less than or equal to 255")


def test_duplicate_yaml_key() -> None:
    message = problem(BASE.replace("  port: 11112\n", "  port: 11112\n  port: 11113\n"))
    assert re.search(r"^node\.yaml:4: duplicate key 'port' \(first at line 3\)", message, re.MULTILINE), message


def test_several_problems_one_line_each() -> None:
    text = BASE.replace("ae_title: DICOMNODE", "ae_title: ABCDEFGHIJKLMNOPQR").replace("port: 11112", "port: 0")
    message = problem(text)
    assert len(message.splitlines()) == 2
    assert_problem(message, 2, "node.ae_title", "at most 16")
    assert_problem(message, 3, "node.port", "greater than or equal to 1")


def test_yaml_syntax_error_names_the_line() -> None:
    message = problem("node:\n  port: [11112\n  ae_title: X\n")
    assert re.match(r"node\.yaml:3: YAML syntax error: ", message), message


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n"])
def test_empty_file(text: str) -> None:
    assert "node.yaml: the configuration is empty" in problem(text)


def test_top_level_must_be_a_mapping() -> None:
    assert "node.yaml:1: the configuration must be a mapping" in problem("- node\n")
