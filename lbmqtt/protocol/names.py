"""Names on the wire: users, nodes, task ids and names, resources; the one definition of
each pattern (config, access and the models use these)."""

from __future__ import annotations

import re
from typing import Annotated, Final

from pydantic import Field, StrictInt

VERSION: Final = 1

NAME_PATTERN: Final = r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$"
"""User and node names: they appear in topics and in ACL patterns."""
TASK_ID_PATTERN: Final = r"^[A-Za-z0-9_][A-Za-z0-9_.:@-]{0,127}$"
"""Task ids: they appear in topics, so no ``/``, ``+``, ``#`` and no leading ``$``."""
TASK_NAME_PATTERN: Final = r"^[A-Za-z0-9_][A-Za-z0-9_.:-]{0,127}$"

Name = Annotated[str, Field(pattern=NAME_PATTERN)]
TaskId = Annotated[str, Field(pattern=TASK_ID_PATTERN)]
TaskName = Annotated[str, Field(pattern=TASK_NAME_PATTERN)]
Priority = Annotated[StrictInt, Field(ge=-(2**31), le=2**31 - 1)]
RESOURCE_PATTERN: Final = r"^[A-Za-z_][A-Za-z0-9_.-]{0,63}$"
"""Names of counted resources (``gpu``, ``memory_mb``, ``license.matlab``) and of tags."""
PREFIX_PATTERN: Final = r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$"
"""The topic prefix (TOPIC_PREFIX): levels of letters, digits and ``_.-``, no wildcard."""
ResourceName = Annotated[str, Field(pattern=RESOURCE_PATTERN)]
Amount = Annotated[float, Field(gt=0, le=1e12, allow_inf_nan=False)]

NAME_RE: Final = re.compile(NAME_PATTERN)
"""The compiled :data:`NAME_PATTERN`."""
_TASK_ID_RE = re.compile(TASK_ID_PATTERN)


def is_valid_name(name: str) -> bool:
    """True if ``name`` can be a user or node name (a single topic level, ACL-safe)."""
    return bool(NAME_RE.match(name))


def is_valid_task_id(task_id: str) -> bool:
    """True if ``task_id`` can be a task id."""
    return bool(_TASK_ID_RE.match(task_id))
