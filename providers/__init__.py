"""providers package."""

__all__: list[str] = []
