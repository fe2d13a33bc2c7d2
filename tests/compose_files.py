"""Compose files as `docker compose -f a.yml -f b.yml` sees them, without Docker.

merge() follows the compose specification's merge rules
(https://github.com/compose-spec/compose-spec/blob/main/13-merge.md) for what our files use:
mappings merge key by key, `command`, `entrypoint` and `healthcheck.test` are replaced, a
service's `volumes` are unique by container path and its `ports` by value, other sequences
are appended. Anything it does not handle fails loudly rather than merging wrongly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
SENTINEL_FILE = REPO_ROOT / "docker-compose.sentinel.yml"

# Service attributes whose value the later file replaces (relative to a service).
REPLACED = {("command",), ("entrypoint",), ("healthcheck", "test")}
# Attributes that must be mappings to merge: the list form (`- KEY=value`) is not handled.
MAPPINGS_ONLY = {"environment", "labels", "depends_on", "extra_hosts", "sysctls"}


def load(path: Path) -> dict[str, Any]:
    """Return one compose file as YAML reads it (anchors and `<<` merge keys resolved)."""
    loaded: dict[str, Any] = yaml.safe_load(path.read_text())
    return loaded


def stack(*paths: Path) -> dict[str, Any]:
    """Return the model the files make together, each merged over the ones before it."""
    model: dict[str, Any] = {}
    for path in paths:
        model = merge(model, load(path))
    return model


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Return override merged over base, as compose merges a later -f file."""
    return _merge_mapping(base, override, ())


def volume_target(volume: str | dict[str, Any]) -> str:
    """Return the container path of a service volume, short or long syntax."""
    if isinstance(volume, dict):
        return str(volume["target"])
    parts = volume.split(":")
    return parts[1] if len(parts) > 1 else parts[0]


def _merge_mapping(base: dict[str, Any], override: dict[str, Any],
                   path: tuple[str, ...]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        merged[key] = _merge_value(base.get(key), value, (*path, key)) if key in base else value
    return merged


def _merge_value(base: Any, override: Any, path: tuple[str, ...]) -> Any:
    in_service = path[2:] if path[:1] == ("services",) and len(path) > 2 else None
    if in_service in REPLACED:
        return override
    mapping_only = in_service is not None and len(in_service) == 1 and (
        in_service[0] in MAPPINGS_ONLY)
    if mapping_only and not (isinstance(base, dict) and isinstance(override, dict)):
        raise NotImplementedError(f"{'.'.join(path)}: only the mapping form is merged here")
    if base is None or override is None:
        return base if override is None else override
    if isinstance(base, dict) and isinstance(override, dict):
        return _merge_mapping(base, override, path)
    if isinstance(base, list) and isinstance(override, list):
        if in_service == ("volumes",):
            kept = [v for v in base if volume_target(v) not in {volume_target(o) for o in override}]
            return kept + override
        if in_service == ("ports",):
            return base + [port for port in override if port not in base]
        if in_service is not None and in_service[0] in ("secrets", "configs"):
            raise NotImplementedError(f"{'.'.join(path)}: not merged here")
        return base + override
    if isinstance(base, dict | list) or isinstance(override, dict | list):
        raise NotImplementedError(f"{'.'.join(path)}: a {type(base).__name__} and a "
                                  f"{type(override).__name__} do not merge")
    return override
