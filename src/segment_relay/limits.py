"""Pure bookkeeping of Infinario's project-wide limits.

An Infinario project holds at most 255 distinct event types and 255 customer property keys;
a command that would create the 256th is refused by the destination. The relay remembers what
it has sent (persisted by the store) and dead-letters such a message itself, with a reason that
names the limit, instead of sending it to be refused.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from .mapping import Command

PROJECT_LIMIT = 255
EVENT_TYPE = "event_type"
CUSTOMER_PROPERTY = "customer_property"


@dataclass
class ProjectLimits:
    """The names known to the destination project, and the rule for admitting new ones."""

    event_types: set[str] = field(default_factory=set)
    customer_properties: set[str] = field(default_factory=set)
    limit: int = PROJECT_LIMIT

    @classmethod
    def from_names(
        cls, names: Iterable[tuple[str, str]], limit: int = PROJECT_LIMIT
    ) -> ProjectLimits:
        """Build from (kind, name) pairs as the store keeps them."""
        limits = cls(limit=limit)
        for kind, name in names:
            (limits.event_types if kind == EVENT_TYPE else limits.customer_properties).add(name)
        return limits

    def admit(self, command: Command) -> tuple[str | None, list[tuple[str, str]]]:
        """Admit a command: (None, new names to remember) or (the refusal reason, [])."""
        if command.event_type is not None:
            if command.event_type in self.event_types:
                return None, []
            if len(self.event_types) >= self.limit:
                return (
                    f"the project already has {self.limit} event types (Infinario's limit); "
                    f"{command.event_type!r} would be one more",
                    [],
                )
            self.event_types.add(command.event_type)
            return None, [(EVENT_TYPE, command.event_type)]
        new = [key for key in command.properties if key not in self.customer_properties]
        if len(self.customer_properties) + len(new) > self.limit:
            return (
                f"the project already has {len(self.customer_properties)} customer properties "
                f"and the limit is {self.limit}; "
                f"this update adds {len(new)} more: {', '.join(new[:5])}",
                [],
            )
        self.customer_properties.update(new)
        return None, [(CUSTOMER_PROPERTY, key) for key in new]
