"""Configuration of destinations (dimse | dicomweb) and of the outbox (send:)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicom_node.errors import ConfigError
from dicom_node.settings import DicomwebAuth, load_settings_text

RULE = """rules:
  - {name: r, when: {Modality: CT}, run: [m], send_to: [web]}
models:
  m: {type: builtin, name: lungs-ct}
"""


def _problem(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_settings_text(text, source="node.yaml")
    return str(info.value)


def test_dicomweb_destination_with_bearer_token_from_the_environment() -> None:
    settings = load_settings_text("destinations:\n  web:\n    type: dicomweb\n"
                                  "    url: https://pacs.example.org/dicom-web/\n"
                                  "    auth: {type: bearer, token_env: PACS_TOKEN}\n" + RULE)
    web = settings.destinations["web"]
    assert web.type == "dicomweb" and web.url == "https://pacs.example.org/dicom-web"
    assert web.verify_tls and web.timeout_s == 30 and web.auth is not None
    assert settings.warnings() == ["node.allowed_peers is empty: associations from any peer are accepted"]


@pytest.mark.parametrize(("entry", "line", "key", "words"), [
    ("{type: dicomweb, url: 'ftp://pacs/dicom-web'}", 3, "destinations.web.url", "http:// or https://"),
    ("{type: dicomweb, url: 'https://u:p@pacs/dicom-web'}", 3, "destinations.web.url", "must not contain credentials"),
    ("{type: dicomweb}", 3, "destinations.web.url", "required key is missing"),
    ("{type: dicomweb, url: 'https://pacs', auth: {type: bearer}}", 3, "destinations.web.auth",
     "exactly one of token_env or token_file"),
    ("{type: dicomweb, url: 'https://pacs', auth: {type: basic, password_env: PW}}", 3, "destinations.web.auth",
     "basic auth needs username"),
    ("{type: dicomweb, url: 'https://pacs', auth: {type: bearer, token_env: 'not a name'}}", 3,
     "destinations.web.auth.token_env", "not an environment variable name"),
    ("{type: dicomweb, url: 'https://pacs', auth: {type: bearer, token: abc}}", 3, "destinations.web.auth.token",
     "unknown key"),
    ("{type: dicomweb, url: 'https://pacs', verify_tls: false, ca_file: /etc/ca.pem}", 3, "destinations.web",
     "ca_file is set but verify_tls is false"),
    ("{type: stow, url: 'https://pacs'}", 3, "destinations.web.type", "unknown type 'stow'"),
])
def test_bad_dicomweb_destination_names_key_and_line(entry: str, line: int, key: str, words: str) -> None:
    message = _problem(f"node: {{}}\ndestinations:\n  web: {entry}\n")
    assert f"node.yaml:{line}: {key}: " in message and words in message, message


def test_send_policy_keys() -> None:
    settings = load_settings_text("send: {max_age_hours: 0.5, health_check_s: 2}\n")
    assert settings.send.max_age_hours == 0.5 and settings.send.health_check_s == 2
    assert "send.health_check_s" in _problem("send: {health_check_s: 0}\n")
    assert "send.max_age_hours" in _problem("send: {max_age_hours: -1}\n")


def test_secret_is_read_when_needed_and_never_shown(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    auth = DicomwebAuth(type="basic", username="node", password_file=tmp_path / "pw")
    with pytest.raises(ConfigError, match="cannot read the DICOMweb password file"):
        auth.secret()
    (tmp_path / "pw").write_text("  hunter2\n")
    assert auth.secret() == "hunter2"
    (tmp_path / "pw").write_text("\n")
    with pytest.raises(ConfigError, match="is empty"):
        auth.secret()
    monkeypatch.setenv("PACS_TOKEN", "tok")
    assert DicomwebAuth(type="bearer", token_env="PACS_TOKEN").secret() == "tok"


def test_insecure_dicomweb_settings_are_warned_about() -> None:
    settings = load_settings_text("destinations:\n  web: {type: dicomweb, url: 'http://pacs/dicom-web', "
                                  "verify_tls: false, auth: {type: basic, username: u, password_env: PW}}\n" + RULE)
    notes = settings.warnings()
    assert "destination 'web' sends credentials over plain http: use https" in notes
    assert "destination 'web' does not verify the server's TLS certificate (verify_tls: false)" in notes
