"""Fault injection for tests: real crashes at precise points, driven by one environment variable.

``RECGPT_FAULT`` holds comma-separated entries ``ACTION:STEP:RANK`` (``*`` = any step / any rank):

- ``kill:25:1``                 rank 1 SIGKILLs itself right after optimizer step 25 finished
- ``kill_before_publish:20:1``  rank 1 SIGKILLs itself while checkpoint step 20 is being written:
                                after its own DeepSpeed shard, reader and RNG state are on disk and
                                before the checkpoint is marked complete and published
- ``kill_during_upload:20:0``   rank 0 SIGKILLs itself while checkpoint step 20 is mirrored to an
                                object store (``train.output_dir=s3://…``): after its files are
                                uploaded and before its ``COMPLETE`` object is
- ``nan:3:1``                   rank 1's loss of the first micro-batch of step 3 becomes NaN (once)
- ``nan:*:*``                   every loss on every rank is NaN (exercises train.max_bad_steps)

Unset in normal runs; parsing costs nothing then.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass, field

from configs.errors import ConfigError

ACTIONS = ("kill", "kill_before_publish", "kill_during_upload", "nan")


def _step_or_rank(value: str) -> bool:
    return value == "*" or (value.isdecimal() and str(int(value)) == value)


@dataclass
class Faults:
    rank: int
    entries: list[tuple[str, str, str]] = field(default_factory=list)
    fired: set[tuple[str, str, str]] = field(default_factory=set)

    @classmethod
    def from_env(cls, rank: int) -> Faults:
        spec = os.environ.get("RECGPT_FAULT", "").strip()
        entries = []
        for raw in filter(None, (s.strip() for s in spec.split(","))):
            parts = raw.split(":")
            # STEP and RANK are '*' or a plain non-negative integer: anything else ('x', '01', '-1')
            # would never match and the test relying on the fault would pass without it.
            if len(parts) != 3 or parts[0] not in ACTIONS or not all(map(_step_or_rank, parts[1:])):
                raise ConfigError(
                    f"RECGPT_FAULT: bad entry {raw!r} (ACTION:STEP:RANK, STEP and RANK a number or *, "
                    f"actions {', '.join(ACTIONS)})"
                )
            entries.append((parts[0], parts[1], parts[2]))
        return cls(rank=rank, entries=entries)

    def _hit(self, action: str, step: int) -> bool:
        for e in self.entries:
            a, s, r = e
            if a != action or r not in ("*", str(self.rank)) or s not in ("*", str(step)):
                continue
            # A step-specific fault fires once (the step's next micro-batch is clean).
            if s != "*" and e in self.fired:
                continue
            self.fired.add(e)
            return True
        return False

    def maybe_kill(self, action: str, step: int) -> None:
        if self.entries and self._hit(action, step):
            print(f"[recgpt fault] rank {self.rank}: SIGKILL at {action} step {step}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

    def nan_loss(self, step: int) -> bool:
        return bool(self.entries) and self._hit("nan", step)
