"""proxyExecution.json: refusal at load with the offending path and reason; the published
schema stays in sync with the model and agrees with it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from gateway.config import SCHEMA_PATH, config_schema, load_config, schema_text
from gateway.errors import ConfigError

GOOD: dict[str, Any] = {
    "$schema": "./proxyExecution.schema.json",
    "hopLimit": 4,
    "rules": {
        "fs:*": {"mode": "local"},
        "exec:run": {"mode": "proxy", "environment": "sandbox"},
        "llm": {"mode": "proxy", "capability": "llm"},
        "search:*": {"mode": "proxy", "environments": ["b", "c"]},
        "*:ping": {"mode": "proxy", "capability": "net", "fanout": True},
        "*": {"mode": "local"},
    },
}

BAD: list[tuple[Any, str]] = [
    ({"rules": {"fs": {"mode": "proxy"}}}, "rules.fs: .*exactly one of"),
    ({"rules": {"fs": {"mode": "proxy", "environment": "a", "capability": "x"}}}, "got"),
    ({"rules": {"fs": {"mode": "remote"}}}, "rules.fs: .*'local', 'proxy'"),
    ({"rules": {"fs": {"mode": "local", "environment": "a"}}}, "rules.fs.environment: Extra"),
    ({"rules": {"a b": {"mode": "local"}}}, r"rules.a b.\[key\]"),
    ({"rules": {"fs:read:x": {"mode": "local"}}}, "key"),
    ({"rules": {"f*": {"mode": "local"}}}, "key"),
    ({"rules": {"fs": {"mode": "local"}, "fs:*": {"mode": "local"}}}, "same rule"),
    ({"rules": {"x": {"mode": "proxy", "environment": "../etc"}}}, "rules.x.environment"),
    ({"rules": {"x": {"mode": "proxy", "environments": ["b", "b"]}}}, "twice"),
    ({"rules": {"x": {"mode": "proxy", "environments": []}}}, "rules.x.environments"),
    ({"rules": {"x": {"mode": "proxy", "environment": "b", "fanout": True}}}, "fanout"),
    ({"hopLimit": 0}, "hopLimit"),
    ({"version": 2}, "version"),
    ({"rule": {}}, "rule: Extra"),
    ([], "document"),
]


def test_good_config_loads(tmp_path: Path) -> None:
    path = tmp_path / "proxyExecution.json"
    path.write_text(json.dumps(GOOD))
    config = load_config(path)
    assert config.hopLimit == 4 and len(config.rules) == 6
    jsonschema.validate(GOOD, config_schema())


@pytest.mark.parametrize(("doc", "reason"), BAD)
def test_bad_config_refused_naming_file_and_field(tmp_path: Path, doc: Any, reason: str) -> None:
    path = tmp_path / "proxyExecution.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match=reason) as info:
        load_config(path)
    assert info.value.path == str(path)
    assert str(path) in str(info.value)


#: Field-level mistakes the published schema catches too (editors flag them as you type).
#: Cross-field rules (exactly one target, no synonym keys, no duplicates) are the model's.
SCHEMA_CATCHES = [
    doc
    for doc, reason in BAD
    if not any(w in reason for w in ("exactly one", "got", "same rule", "twice", "fanout"))
]


@pytest.mark.parametrize("doc", SCHEMA_CATCHES)
def test_schema_refuses_what_the_model_refuses(doc: Any) -> None:
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(doc, config_schema())


def test_unreadable_and_non_json_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(bad)


def test_published_schema_is_in_sync() -> None:
    assert SCHEMA_PATH.read_text(encoding="utf-8") == schema_text(), (
        "gateway/proxyExecution.schema.json is stale: run python -m gateway.config"
    )


def test_with_rules_replaces_a_key_and_its_synonym_and_keeps_the_rest(tmp_path: Path) -> None:
    from gateway.config import ProxyRule, parse_config, with_rules

    given = parse_config(GOOD)
    to_hub = ProxyRule(mode="proxy", environment="hub")
    merged = with_rules(given, {"fs": to_hub, "search": to_hub, "*:*": to_hub})
    assert merged.rules["fs"] == merged.rules["search"] == merged.rules["*:*"] == to_hub
    assert {"fs:*", "search:*", "*"}.isdisjoint(merged.rules)  # their synonyms went
    assert merged.rules["exec:run"] == given.rules["exec:run"]  # the others stayed
    assert merged.hopLimit == 4 and given.rules["fs:*"].mode == "local"  # a copy
    parse_config(merged.model_dump(mode="json", by_alias=True, exclude_none=True))  # valid
