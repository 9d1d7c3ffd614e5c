"""Anchor of the docker provider's ``narrative run`` overhead (issue 4, DESIGN.md §6).

The anchor is what a user would do by hand with the docker CLI, against the same daemon and the
same image: ``docker run`` of ``true`` (create + start + wait, no ``--rm`` so the container can
be copied into afterwards), ``docker cp DIR/. C:/work`` in, and ``docker cp C:/work OUT`` back
out. :func:`time_docker_anchor` times one round (each step with peak RSS, through
``common.run``); the lead pairs it with the provider-run measurement, alternating sides.

The image is built offline (``docker import`` of a skeleton root file system, never a pull) and
run with the host's ``/usr`` bind-mounted read-only and ``--network none``, exactly as the
docker provider tests do; :func:`ensure_image` builds it once per daemon.

Usage (starts a private engine with ``scripts/docker-engine.sh`` when DOCKER_HOST is unset)::

    python bench/bench_docker_anchor.py --files 5000 --size-mb 100 --reps 5
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from common import Proc, check, log, run

from providers.docker.image import skeleton_rootfs

__all__ = [
    "BENCH_IMAGE",
    "HOST_MOUNTS",
    "AnchorRound",
    "docker_engine",
    "ensure_image",
    "time_docker_anchor",
]

BENCH_IMAGE = "narrative-bench-base:1"
HOST_MOUNTS = ["/usr:/usr:ro"]
REPO = Path(__file__).resolve().parent.parent


@dataclass
class AnchorRound:
    """One timed anchor round: seconds and peak RSS (KiB) per step."""

    run: Proc
    cp_in: Proc
    cp_out: Proc
    steps: dict[str, float] = field(init=False)

    def __post_init__(self) -> None:
        self.steps = {
            "run": self.run.seconds,
            "cp_in": self.cp_in.seconds,
            "cp_out": self.cp_out.seconds,
        }

    @property
    def seconds(self) -> float:
        return sum(self.steps.values())

    @property
    def maxrss_kib(self) -> int:
        return max(self.run.maxrss_kib, self.cp_in.maxrss_kib, self.cp_out.maxrss_kib)


def ensure_image(env: dict[str, str], image: str = BENCH_IMAGE) -> str:
    """``image`` on the daemon of ``env``'s DOCKER_HOST, imported offline if absent."""
    probe = subprocess.run(
        ["docker", "image", "inspect", image], env=env, capture_output=True, check=False
    )
    if probe.returncode != 0:
        subprocess.run(
            ["docker", "import", "-", image],
            input=skeleton_rootfs(),
            env=env,
            capture_output=True,
            check=True,
        )
    return image


def time_docker_anchor(
    src: Path,
    out: Path,
    env: dict[str, str],
    image: str = BENCH_IMAGE,
    mounts: list[str] | None = None,
    workdir: str = "/work",
) -> AnchorRound:
    """Time ``docker run IMAGE true`` + ``docker cp SRC/. C:WORKDIR`` + ``docker cp
    C:WORKDIR OUT`` once; the container and OUT are removed afterwards (untimed).

    ``src`` holds just the workspace's files (no store directory); ``env`` carries
    DOCKER_HOST; ``out`` must not exist.
    """
    name = f"narrative-anchor-{uuid.uuid4().hex[:12]}"
    volumes = [arg for m in (HOST_MOUNTS if mounts is None else mounts) for arg in ("-v", m)]
    cwd = src.parent
    try:
        argv = ["docker", "run", "--name", name, "--network", "none", "-w", workdir, *volumes]
        started = check(run([*argv, image, "true"], env=env, cwd=cwd))
        cp_in = check(run(["docker", "cp", f"{src}/.", f"{name}:{workdir}"], env=env, cwd=cwd))
        cp_out = check(run(["docker", "cp", f"{name}:{workdir}", str(out)], env=env, cwd=cwd))
        return AnchorRound(started, cp_in, cp_out)
    finally:
        subprocess.run(["docker", "rm", "-f", name], env=env, capture_output=True, check=False)
        shutil.rmtree(out, ignore_errors=True)


@contextmanager
def docker_engine(env: dict[str, str]) -> Iterator[dict[str, str]]:
    """``env`` as is when it names a DOCKER_HOST; otherwise a private engine for the duration
    (``scripts/docker-engine.sh``, the DESIGN.md §5 flags) and ``env`` pointing at it."""
    if env.get("DOCKER_HOST"):
        yield env
        return
    script = REPO / "scripts" / "docker-engine.sh"
    engine_dir = tempfile.mkdtemp(prefix="narrative-dockerd-bench.")
    subprocess.run([str(script), "start", engine_dir], check=True)
    try:
        yield {**env, "DOCKER_HOST": f"unix://{engine_dir}/docker.sock"}
    finally:
        stopped = subprocess.run([str(script), "stop", engine_dir], check=False).returncode == 0
        if stopped:
            subprocess.run(["rm", "-rf", "--one-file-system", engine_dir], check=False)


def _main(argv: list[str] | None = None) -> int:
    import workspace

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=5000)
    ap.add_argument("--size-mb", type=float, default=100.0)
    ap.add_argument("--seed", type=int, default=workspace.DEFAULT_SEED)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="narrative-bench-docker.") as tmp:
        src = Path(tmp) / "ws"
        info = workspace.generate(src, files=args.files, size_mb=args.size_mb, seed=args.seed)
        log(f"workspace: {info}")
        with docker_engine(dict(os.environ)) as env:
            ensure_image(env)
            rounds = []
            for rep in range(args.reps):
                rounds.append(time_docker_anchor(src, Path(tmp) / f"out-{rep}", env))
                log(f"rep {rep + 1}: {rounds[-1].steps} total {rounds[-1].seconds:.3f}s")
    print("| step | median s |")
    print("|---|---|")
    for step in ("run", "cp_in", "cp_out"):
        print(f"| {step} | {statistics.median(r.steps[step] for r in rounds):.3f} |")
    print(f"| **total** | {statistics.median(r.seconds for r in rounds):.3f} |")
    print(f"peak RSS {max(r.maxrss_kib for r in rounds) / 1024:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(_main())
