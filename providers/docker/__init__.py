"""The ``docker`` provider: one container per environment, through the Docker Engine API.

* :mod:`.config`: its configuration (no SDK needed to validate one);
* :mod:`.image`: the default image, built offline from this host, and the host runtime;
* :mod:`.client`: the Engine API client and the translation of its errors;
* :mod:`.commands`: execs (streamed), helper commands and spawned processes;
* :mod:`.files`: files, restore and collect through the archive endpoints;
* :mod:`.meter`: a run's CPU and memory from the container's cgroup counters;
* :mod:`.provider`: :class:`~providers.docker.provider.DockerProvider`, the lifecycle.

Only :mod:`.config` is exported here: importing the package must not need the optional SDK
(``pip install 'narrative-engine[docker]'``), which every other module imports. Inside this
package ``import docker`` is the SDK (absolute imports; the package is ``providers.docker``).
"""

from .config import DEFAULT_IMAGE, DockerConfig, DockerMount

__all__ = ["DEFAULT_IMAGE", "DockerConfig", "DockerMount"]
