"""The ``ssh`` provider: environments on a remote Linux host, reached with ``asyncssh``.

:mod:`.config` (validated without asyncssh installed), :mod:`.session` (connections, host-key
trust, commands, SFTP, the reverse tunnel to the hub), :mod:`.install` (the runtime installed
on the remote from a wheelhouse the client sends) and :mod:`.provider` (the adapter).
"""

from .config import SSHConfig

__all__ = ["SSHConfig"]
