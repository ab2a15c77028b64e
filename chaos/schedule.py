"""The faults a seed draws: which kinds, and when, as a share of the job's videos done (not as
wall time), so a replay on a slower machine meets the same interleaving as far as it can."""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass

from chaos.faults import KINDS


@dataclass(frozen=True)
class Fault:
    at: float  # fires once this share of the job's videos is done (latest ok or rejected in the ledger)
    kind: str
    seed: int  # of the fault's own choices (which worker, how long)

    def rng(self) -> random.Random:
        return random.Random(self.seed)

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def draw(seed: int, count: int) -> list[Fault]:
    """`count` faults: every kind once while count allows (in a drawn order), the rest at random."""
    rng = random.Random(seed)
    kinds = list(KINDS)
    rng.shuffle(kinds)
    chosen = (kinds * (count // len(kinds) + 1))[: min(count, len(kinds))]
    chosen += [rng.choice(list(KINDS)) for _ in range(count - len(chosen))]
    moments = sorted(round(rng.uniform(0.02, 0.9), 3) for _ in chosen)
    rng.shuffle(chosen)
    return [Fault(at, kind, rng.randrange(2**31)) for at, kind in zip(moments, chosen, strict=True)]
