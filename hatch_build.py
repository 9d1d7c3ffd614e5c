"""Build hook: compiles the snapshot walk's C lister (``narrative/_listing.c``) next to its
source, for wheels and editable installs alike.

The lister is an accelerator, not a requirement: without a C compiler (or Python's headers) the
build goes on, says so, and ships the pure-Python package, whose walk lists directories with
``os.scandir`` instead (docs/decisions.md, "The snapshot walk lists directories in C").
``NARRATIVE_PURE_WHEEL=1`` builds that pure wheel on purpose: one wheel for any Python 3.11+.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

SOURCE = Path("narrative") / "_listing.c"


def compile_listing(root: Path) -> Path | None:
    """Compile the lister into ``narrative/``; its path, or None (with the reason on stderr)."""
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    target = root / SOURCE.with_name("_listing" + suffix)
    compiler = shlex.split(os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc")
    flags = ["-O2", "-fPIC", "-shared", "-std=gnu11"]
    if sys.platform == "darwin":
        flags += ["-undefined", "dynamic_lookup"]
    include = sysconfig.get_paths()["include"]
    staged = target.with_name(target.name + ".tmp")
    argv = [*compiler, *flags, f"-I{include}", str(root / SOURCE), "-o", str(staged)]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
    except OSError as exc:
        _say(f"no C lister built ({exc})")
        return None
    if done.returncode != 0:
        _say(f"no C lister built ({' '.join(argv)} failed: {done.stderr.strip()[:2000]})")
        staged.unlink(missing_ok=True)
        return None
    os.replace(staged, target)  # a running interpreter's mapped copy is never rewritten
    return target


def _say(problem: str) -> None:
    sys.stderr.write(f"narrative: {problem}; the snapshot walk will use os.scandir\n")


class ListingBuildHook(BuildHookInterface):  # type: ignore[type-arg]
    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if self.target_name != "wheel":
            return  # the sdist ships the C source; its installs compile it
        if os.environ.get("NARRATIVE_PURE_WHEEL") == "1":
            return  # a py3-none-any wheel, for an image or host with another Python
        built = compile_listing(Path(self.root))
        if built is None:
            return
        build_data["pure_python"] = False
        build_data["infer_tag"] = True
        if version != "editable":  # an editable install imports it from the checkout itself
            build_data["force_include"][str(built)] = f"narrative/{built.name}"
