"""Fault injection for crash tests: kill the process at a named point of a round.

Setting ``FL2ORA_KILL_AT=<point>:<round>`` (for example ``train:2`` or
``checkpoint-write:3``) makes the process send itself SIGKILL when it reaches that
point in that round, exactly as a crash or an out-of-memory kill would. The points
are ``train`` (after the first client's local update), ``aggregate`` (before the
global state is replaced) and ``checkpoint-write`` (after the temporary checkpoint
file is written, before it replaces the previous one). Unset, it does nothing.
"""

from __future__ import annotations

import os
import signal

KILL_ENV_VAR = "FL2ORA_KILL_AT"

_current_round = 0


def set_round(round_index: int) -> None:
    """Record the round in progress, for matching ``FL2ORA_KILL_AT``."""
    global _current_round
    _current_round = round_index


def fault_point(name: str) -> None:
    """Kill this process with SIGKILL when ``FL2ORA_KILL_AT`` names this point and round."""
    target = os.environ.get(KILL_ENV_VAR)
    if not target:
        return
    point, _, round_text = target.rpartition(":")
    if point == name and round_text.isdigit() and int(round_text) == _current_round:
        os.kill(os.getpid(), signal.SIGKILL)
