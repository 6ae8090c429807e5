"""Directories that are only safe to write into while something is mounted on them.

``Session("/content/drive/MyDrive/ckpt")`` with Drive not mounted used to create the path on the
runtime's local disk, so the checkpoints died with the runtime (issue 11). Each known mount root
below is where a platform mounts persistent storage; a path under one that is not a mount point
right now is refused before anything is created. Torch-free: the daemon may use it too.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Union


@dataclass(frozen=True)
class MountRoot:
    """A directory a platform mounts persistent storage on."""

    path: Path
    what: str  # for people: "Google Drive"
    fix: str  # how to mount it


# Colab: drive.mount() puts Drive on /content/drive; unmounted, /content/drive is a plain local
# directory (or absent). AutoDL (autodl.com/docs/env): /root/autodl-fs is the network file
# storage, mounted only once it is initialised for the region; /root/autodl-nas is the older
# network disk. /root/autodl-tmp is the local data disk: not in the table, since writing to the
# system disk instead loses nothing at a shutdown.
MOUNT_ROOTS: Sequence[MountRoot] = (
    MountRoot(Path("/content/drive"), "Google Drive",
              "run `from google.colab import drive; drive.mount('/content/drive')` first"),
    MountRoot(Path("/root/autodl-fs"), "AutoDL file storage",
              "initialise file storage for this region in the AutoDL console, then restart "
              "the instance"),
    MountRoot(Path("/root/autodl-nas"), "the AutoDL network disk",
              "enable the network disk in the AutoDL console, then restart the instance"),
)


def unmounted_root(
    path: Union[str, os.PathLike[str]],
    roots: Sequence[MountRoot] = MOUNT_ROOTS,
    is_mount: Callable[[str], bool] = os.path.ismount,
) -> Optional[MountRoot]:
    """The mount root ``path`` lies under (or is) while nothing is mounted on it; else None.

    ``path`` is made absolute without following symlinks: what matters is where the user meant
    to write. ``os.path.ismount`` compares the device of the root with its parent's, so an
    absent root is "not mounted" too.
    """
    target = Path(os.path.abspath(path))
    for root in roots:
        if (target == root.path or root.path in target.parents) and not is_mount(str(root.path)):
            return root
    return None


def unmounted_message(path: Union[str, os.PathLike[str]], root: MountRoot) -> str:
    """One line: what is wrong with ``path`` and how to fix it."""
    return (f"{path} is on {root.what}, but {root.path} is not mounted: checkpoints written "
            f"there would land on the local disk and die with the runtime; {root.fix}")
