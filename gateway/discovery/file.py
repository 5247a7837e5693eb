"""File discovery: a YAML or JSON file listing endpoints, polled (no inotify).

The file is read again when its modification time, size or inode changed; an
unreadable or invalid file is a failure (the cluster keeps its last known
endpoints) and is read again on the next poll. An empty list is an answer: the
operator removed every endpoint. Write the file atomically (to a temporary file,
then rename), so that a poll never reads half of it.
"""

from __future__ import annotations

import asyncio
import os

from gateway.discovery.config import EndpointTemplate, FileDiscoveryConfig
from gateway.discovery.endpoints import DiscoveryError, Found, file_endpoints
from kvkernel.decode import ConfigError, load_yaml


class FileSource:
    def __init__(self, config: FileDiscoveryConfig, template: EndpointTemplate) -> None:
        self.config = config
        self.template = template
        self._seen: tuple[int, int, int] | None = None  # (mtime_ns, size, inode) of the last good read
        self._last: Found | None = None

    async def find(self) -> Found:
        return await asyncio.to_thread(self._read)

    def _read(self) -> Found:
        path = self.config.path
        try:
            st = os.stat(path)
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
            if stamp == self._seen and self._last is not None:
                return self._last
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except OSError as exc:
            raise DiscoveryError(f"cannot read {path}: {exc.strerror}") from None
        except UnicodeDecodeError as exc:
            raise DiscoveryError(f"{path} is not UTF-8 text (bad byte at offset {exc.start})") from None
        try:
            data = load_yaml(text, path)  # its errors name the file
        except ConfigError as exc:
            raise DiscoveryError(str(exc)) from None
        try:
            found = Found(file_endpoints(data, self.template))
        except ConfigError as exc:
            raise DiscoveryError(f"{path}: {exc}") from None
        self._seen, self._last = stamp, found
        return found
