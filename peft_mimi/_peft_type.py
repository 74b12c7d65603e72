"""Make "MIMI" a real member of PEFT's `PeftType` enum, so that PEFT code reading `.value` works.

PEFT's enum is closed; `aenum.extend_enum` (by the author of the stdlib `enum`) adds a member the supported way
instead of poking at enum internals. Safe to run any number of times.
"""

from aenum import extend_enum
from peft.utils import PeftType

if "MIMI" not in PeftType.__members__:
    extend_enum(PeftType, "MIMI", "MIMI")

__all__ = ["PeftType"]
