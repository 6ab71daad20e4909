"""Which app version a session comes from (``usage.app_version``): pure, headers in, label out.

Ops ask which releases still use the old auth method, to tell one release that needs a
forced update from a long tail of old installs. The label is client-controlled text, so
it is bounded here (length) and by the store and metrics (how many distinct values).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import lru_cache

from ..core.config import AppVersionConfig
from .store.base import MAX_VERSION_CHARS, UNKNOWN_VERSION


@lru_cache(maxsize=8)
def _compiled(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)  # validated when the config was loaded


def app_version(settings: AppVersionConfig, headers: Iterable[tuple[str, str]]) -> str:
    """The group ``version`` of the pattern's first match in the configured header;
    ``unknown`` when the header is missing, nothing matches, or the version is empty or
    longer than `MAX_VERSION_CHARS`."""
    name = settings.header.lower()
    value = next((v for k, v in headers if k.lower() == name), None)
    match = _compiled(settings.pattern).search(value) if value is not None else None
    version = match.group("version") if match is not None else None
    if not version or len(version) > MAX_VERSION_CHARS:
        return UNKNOWN_VERSION
    return version
