"""``Streaming``: how a streamed plan's passes run (its calibration's, and its corrections' after it)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from .budget import HostBudget

__all__ = ["Streaming"]


@dataclass(frozen=True)
class Streaming:
    """The options of every streamed pass of one plan (:func:`obdk.pipeline.prepare` with ``stream=True``), kept
    on the plan (:attr:`obdk.plan.Plan.stream`) so that its corrections' gradient passes stream alike.

    * ``budget``: the plan's :class:`~obdk.stream.budget.HostBudget` (``max_host_memory`` bytes): the kept spectra,
      statistics and corrected factors and every pass's boundary buffers draw on it together;
    * ``scratch_dir``: where what does not fit goes (None: the system temporary directory);
    * ``batch_size``: calibration windows per layer call;
    * ``device``: the compute device of the passes (None: where the model's input embeddings are);
    * ``source``: the :class:`~obdk.stream.shards.ShardedWeights` a skeleton's decoder layers are read from (None:
      the model holds its weights);
    * ``owners``: prepared under ``torch.distributed`` with statistics kept for a correction, ``{group key: rank}``:
      the rank that holds, and steps, each matrix's statistics (None otherwise); ``world``: the ranks that
      prepared the plan.
    """
    budget: HostBudget
    scratch_dir: Optional[str] = None
    batch_size: int = 1
    device: Any = None
    source: Any = None
    owners: Optional[Mapping[str, int]] = None
    world: int = 1

    @property
    def owner_reduced(self) -> bool:
        """Each rank holds only the statistics of the matrices it owns (the corrections run on every rank)."""
        return self.owners is not None

    def pass_options(self) -> dict[str, Any]:
        """The keyword arguments of :func:`~obdk.calibrate.stream.calibrate_streamed` for one of the plan's passes."""
        return {"scratch_dir": self.scratch_dir, "budget": self.budget, "batch_size": self.batch_size,
                "device": self.device, "source": self.source}

    def with_owners(self, owners: Mapping[str, int], world: int) -> "Streaming":
        """A copy that records the owner map of an owner-reduced calibration over ``world`` ranks."""
        return dataclasses.replace(self, owners=dict(owners), world=int(world))
