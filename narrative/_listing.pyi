# The C lister (narrative/_listing.c), built at install when a C compiler is present.

def list_dir(
    fd: int, /
) -> tuple[
    list[str], list[tuple[int, int, int, int, int]], list[str], list[tuple[str, int, bool]]
]: ...
