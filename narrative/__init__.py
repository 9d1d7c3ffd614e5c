"""narrative package."""

__all__: list[str] = []
