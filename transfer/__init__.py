"""transfer package."""

__all__: list[str] = []
