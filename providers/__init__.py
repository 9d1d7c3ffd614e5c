"""providers package (see DESIGN.md §2); its features arrive with their issues."""

__all__: list[str] = []
