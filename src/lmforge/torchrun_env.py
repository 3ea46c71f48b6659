"""What torchrun tells a process through its environment (RANK, WORLD_SIZE), read without importing torch:
commands run without torchrun never load it for this."""

from __future__ import annotations

import os


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def torchrun_processes() -> int:
    """How many processes torchrun started for this job (1 when not launched by torchrun)."""
    return int(os.environ["WORLD_SIZE"]) if launched_by_torchrun() else 1


def torchrun_rank() -> int:
    """This process's global rank (0 when not launched by torchrun), known before any process group exists."""
    return int(os.environ.get("RANK", "0"))
