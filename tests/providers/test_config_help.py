"""``narrative env create --provider P --help`` lists each config field with its attribute
docstring, read from the source when asked (not by pydantic at import, which costs every
process that loads providers)."""

from __future__ import annotations

from pydantic import Field

from providers.base import ProviderConfig, config_help


class _SampleConfig(ProviderConfig):
    image: str = "base"
    """The image to start from
    (two lines)."""
    cpus: int = Field(default=1, description="Given explicitly.")
    """Not this: an explicit description wins."""
    undocumented: bool = False


def test_config_help_shows_each_fields_docstring_own_and_inherited() -> None:
    rows = dict(config_help(_SampleConfig))
    assert rows["image=str"] == "[default 'base'] The image to start from (two lines)."
    assert rows["cpus=int"] == "[default 1] Given explicitly."
    assert rows["undocumented=bool"] == "[default False]"
    assert rows["max_events=int"].startswith("[default 10000] Most events of its runtime")
