"""A directory laid out and updated the way the kubelet does a ConfigMap or Secret volume.

The kubelet's AtomicWriter (pkg/volume/util/atomic_writer.go) never writes a file in place:

    <dir>/..2026_12_04_18_00_00.123456789/config.yaml   the payload, one directory per version
    <dir>/..data -> ..2026_12_04_18_00_00.123456789     the version in force
    <dir>/config.yaml -> ..data/config.yaml              what the pod sees, never touched again

An update writes a new timestamped directory, points a ``..data_tmp`` symlink at it, renames that
onto ``..data`` (the one atomic step), adds symlinks for new keys and removes the old directory.
A watcher that looks at ``config.yaml`` itself (lstat, or an inotify watch on the link) sees nothing.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
from pathlib import Path


class KubeletVolume:
    def __init__(self, directory: Path, files: dict[str, str]) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.versions: list[str] = []
        self.update(files)

    def path(self, key: str) -> Path:
        return self.dir / key

    def update(self, files: dict[str, str]) -> None:
        """Swap in a new version holding ``files`` (key → text), as the kubelet does."""
        stamp = dt.datetime.now(dt.UTC).strftime("..%Y_%m_%d_%H_%M_%S.%f") + f"{len(self.versions):03d}"
        version = self.dir / stamp
        version.mkdir()
        for key, text in files.items():
            (version / key).write_text(text)
        tmp = self.dir / "..data_tmp"
        tmp.symlink_to(stamp)
        os.rename(tmp, self.dir / "..data")
        for key in files:
            link = self.dir / key
            if not link.is_symlink():
                link.symlink_to(f"..data/{key}")
        for old in self.versions:
            shutil.rmtree(self.dir / old)
        self.versions = [stamp]
