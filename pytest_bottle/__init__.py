"""pytest-bottle: real Linux microVMs as pytest fixtures.

The core (this package minus ``plugin``) imports without pytest::

    with pytest_bottle.launch(image="debian-bookworm") as b:
        print(b.check_output("uname -r"))
"""

from __future__ import annotations

from .bottle import Bottle
from .errors import (
    AgentError,
    AgentTimeout,
    BootError,
    BootTimeout,
    BottleError,
    ExecError,
    ExecTimeout,
    GuestOSError,
    HostDependencyError,
    ImageBuildError,
    ImageImportError,
    ImageNotFound,
    LockTimeout,
    OutputLimit,
    OutputTimeout,
    PoolExhausted,
    ProcessTimeout,
    SnapshotError,
    SnapshotGone,
    SpecError,
    UnsafeDirectory,
    UnsafeTransfer,
    WaitTimeout,
)
from .images.image import Image
from .lifecycle.launch import launch
from .process import GuestProcess
from .results import ExecResult
from .snapshot import Snapshot
from .spec import BottleSpec

__version__ = "0.1.0"

__all__ = [
    "AgentError",
    "AgentTimeout",
    "BootError",
    "BootTimeout",
    "Bottle",
    "BottleError",
    "BottleSpec",
    "ExecError",
    "ExecResult",
    "ExecTimeout",
    "GuestOSError",
    "GuestProcess",
    "HostDependencyError",
    "Image",
    "ImageBuildError",
    "ImageImportError",
    "ImageNotFound",
    "LockTimeout",
    "OutputLimit",
    "OutputTimeout",
    "PoolExhausted",
    "ProcessTimeout",
    "Snapshot",
    "SnapshotError",
    "SnapshotGone",
    "SpecError",
    "UnsafeDirectory",
    "UnsafeTransfer",
    "WaitTimeout",
    "launch",
]
