"""``proxyExecution.json``: which capability calls run here and which are proxied, and where.

Example::

    {
      "hopLimit": 8,
      "rules": {
        "fs:*":          {"mode": "local"},
        "exec:run":      {"mode": "proxy", "environment": "sandbox"},
        "llm":           {"mode": "proxy", "capability": "llm"},
        "search:*":      {"mode": "proxy", "environments": ["b", "c", "d"]},
        "*":             {"mode": "local"}
      }
    }

Rule keys are ``type``, ``type:action``, ``type:*`` (same as ``type``), ``*:action`` or ``*``.
The most specific matching key wins (``type:action`` > ``type`` > ``*:action`` > ``*``); with no
match the call runs locally. The JSON Schema published next to this module
(``proxyExecution.schema.json``) is generated from :class:`ProxyExecutionConfig`; regenerate it
with ``python -m gateway.config``.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Annotated, Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from narrative.errors import validation_problem
from narrative.ids import RULE_KEY_PATTERN
from narrative.jsonio import parse_json

from .errors import ConfigError
from .protocol import ENV_ID_PATTERN

__all__ = [
    "RULE_KEY_PATTERN",
    "SCHEMA_PATH",
    "LocalRule",
    "ProxyExecutionConfig",
    "ProxyRule",
    "Rule",
    "config_schema",
    "load_config",
    "parse_config",
    "with_rules",
]

_KEY_RE = re.compile(RULE_KEY_PATTERN)
SCHEMA_PATH = Path(__file__).with_name("proxyExecution.schema.json")

EnvId = Annotated[str, Field(pattern=ENV_ID_PATTERN)]
Capability = Annotated[str, Field(pattern=r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,63}$")]


class LocalRule(BaseModel):
    """Run matching calls in this environment, with the handler registered for them."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["local"] = Field(description="Run here.")


class ProxyRule(BaseModel):
    """Send matching calls to another environment (exactly one kind of target)."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["proxy"] = Field(description="Run elsewhere.")
    environment: EnvId | None = Field(
        default=None, description="A named environment connected to this gateway."
    )
    environments: Annotated[list[EnvId], Field(min_length=1, max_length=64)] | None = Field(
        default=None,
        description="Fan-out: every one of these environments; the results are gathered in "
        "this order.",
    )
    capability: Capability | None = Field(
        default=None,
        description="Any connected environment that declares this capability (the first by id).",
    )
    fanout: bool = Field(
        default=False,
        description="With ``capability``: every connected environment declaring it, results "
        "gathered.",
    )

    @model_validator(mode="after")
    def _one_target(self) -> Self:
        given = [
            n for n in ("environment", "environments", "capability") if getattr(self, n) is not None
        ]
        if len(given) != 1:
            raise ValueError(
                "a proxy rule needs exactly one of environment, environments, capability"
                + (f" (got {', '.join(given)})" if given else "")
            )
        if self.fanout and self.capability is None:
            raise ValueError("fanout applies to capability targets only")
        if self.environments is not None and len(set(self.environments)) != len(self.environments):
            raise ValueError("environments lists an environment twice")
        return self


Rule = Annotated[LocalRule | ProxyRule, Field(discriminator="mode")]


class ProxyExecutionConfig(BaseModel):
    """The whole ``proxyExecution.json`` document."""

    # Descriptions as Field arguments, not attribute docstrings (use_attribute_docstrings):
    # pydantic finds those by reading this file's source at import, which costs every runtime
    # and hub process a few milliseconds for text only the JSON Schema needs.
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    schema_: str | None = Field(
        default=None,
        alias="$schema",
        description="Optional pointer to the JSON Schema, for editors; ignored.",
    )
    version: Literal[1] = Field(default=1, description="Format version.")
    hopLimit: Annotated[int, Field(ge=1, le=64)] = Field(
        default=8, description="Most gateways a call may pass through, the origin included."
    )
    rules: dict[Annotated[str, Field(pattern=RULE_KEY_PATTERN)], Rule] = Field(
        default={},
        json_schema_extra={"propertyNames": {"pattern": RULE_KEY_PATTERN}},
        description="Rule key -> rule; the most specific key matching a call decides.",
    )

    @model_validator(mode="after")
    def _no_synonyms(self) -> Self:
        # "fs" and "fs:*" mean the same thing; both present would make precedence arbitrary.
        for key in self.rules:
            if key.endswith(":*") and key[:-2] in self.rules and key != "*:*":
                raise ValueError(f"rules {key[:-2]!r} and {key!r} are the same rule")
        if "*:*" in self.rules and "*" in self.rules:
            raise ValueError("rules '*' and '*:*' are the same rule")
        return self


def _canonical(key: str) -> str:
    """The one spelling of a rule key (``fs:*`` is ``fs``, ``*:*`` is ``*``)."""
    return key[:-2] if key.endswith(":*") else key


def with_rules(config: ProxyExecutionConfig, rules: dict[str, Rule]) -> ProxyExecutionConfig:
    """``config`` with ``rules`` added, each replacing the rule of the same key (or of its
    synonym: ``fs`` and ``fs:*``); the other rules and settings are kept."""
    replaced = {_canonical(key) for key in rules}
    kept = {k: v for k, v in config.rules.items() if _canonical(k) not in replaced}
    return config.model_copy(update={"rules": {**kept, **rules}})


def parse_config(data: Any, path: str = "<config>") -> ProxyExecutionConfig:
    """Validate an already-decoded document.

    Raises:
        ConfigError: naming ``path`` and the offending field.
    """
    try:
        return ProxyExecutionConfig.model_validate(data)
    except ValidationError as exc:
        problem = validation_problem(exc, "document", drop=("local", "proxy"))
        raise ConfigError(path, problem) from None


def load_config(path: str | Path) -> ProxyExecutionConfig:
    """Read and validate a ``proxyExecution.json`` file.

    Raises:
        ConfigError: the file cannot be read, is not JSON, or breaks the schema; the message
            names the file and the offending field.
    """
    name = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(name, f"cannot read: {reason}") from None
    try:
        data = parse_json(text)
    except ValueError as exc:
        raise ConfigError(name, f"not valid JSON: {exc}") from None
    return parse_config(data, name)


def config_schema() -> dict[str, Any]:
    """The JSON Schema of ``proxyExecution.json`` (what ``proxyExecution.schema.json`` holds)."""
    schema = ProxyExecutionConfig.model_json_schema(by_alias=True)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "proxyExecution.json"
    return schema


def schema_text() -> str:
    """The schema file's exact text."""
    return json.dumps(config_schema(), indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":  # pragma: no cover - maintenance entry point
    SCHEMA_PATH.write_text(schema_text(), encoding="utf-8")
    sys.stderr.write(f"wrote {SCHEMA_PATH}\n")
