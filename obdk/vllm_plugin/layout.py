"""Where each stored factor row lands in one vLLM Linear on one tensor-parallel rank.

Pure Python and torch (no vLLM import), so it is unit-tested in obdk's main environment too.

A vLLM Linear holds one or more **segments** along its output: a ``QKVParallelLinear`` has three
(q, k, v), a ``MergedColumnParallelLinear`` one per fused output (gate, up), every other Linear one.
On rank ``t`` of ``T`` a segment of global size ``M`` keeps rows ``[start, start + size)``:

* column-parallel: ``size = M / T``, ``start = t · size``; k/v of a ``QKVParallelLinear`` with more
  ranks than KV heads are replicated: ``start = (t // replicas) · size``;
* row-parallel and replicated Linears keep every output row (row-parallel splits the *input*).

A **member** is one module of the checkpoint that the Linear serves: ``q_proj`` of a fused
``qkv_proj`` (one segment), or Phi-3's on-disk ``qkv_proj`` (every segment, its rows stored
segment after segment). A member is low-rank (``<module>.weight_a`` [r, in], ``.weight_b`` [out, r])
or dense (``<module>.weight`` [out, in]). Column-parallel Linears keep ``weight_a`` whole and take
their rows of ``weight_b``; row-parallel Linears take their input columns of ``weight_a`` and keep
``weight_b`` whole (vLLM's all-reduce sums ``B · (A_t x_t)`` over the ranks).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

from ..errors import CheckpointError


@dataclass(frozen=True)
class Segment:
    """One output segment of a Linear: ``global_size`` rows in the checkpoint, of which this rank keeps
    ``[start, start + size)``."""
    global_size: int
    start: int
    size: int


@dataclass(frozen=True)
class Member:
    """A checkpoint module served by (part of) one Linear.

    ``name``: the module's name in the checkpoint (``model.layers.0.self_attn.k_proj``);
    ``rank``: its rank, or None when it is stored dense; ``segments``: indices of the Linear's segments
    it fills, in order (its stored rows are those segments' global rows one after the other)."""
    name: str
    rank: Optional[int]
    segments: tuple[int, ...]

    @property
    def lowrank(self) -> bool:
        return self.rank is not None


@dataclass
class LinearLayout:
    """The members and segments of one Linear on one rank, and where each member's rows go.

    ``in_global``/``in_local``/``in_start``: the input features of the stored matrices, those this rank
    keeps (``in_start`` their first column; row-parallel Linears only split the input).
    Derived: ``lowrank`` and ``dense`` (members of each kind, in member order), ``local_out[g]``
    (the rows member ``g`` contributes on this rank), ``ranks`` and ``outs`` of the low-rank members
    (for ``obdk::lowrank_linear_grouped``), and ``pieces``: for every member in output order,
    ``(kind, offset, size)`` — its rows' offset in the low-rank or dense partial output.
    """
    prefix: str
    members: tuple[Member, ...]
    segments: tuple[Segment, ...]
    in_global: int
    in_local: int
    in_start: int = 0
    lowrank: tuple[int, ...] = field(init=False)
    dense: tuple[int, ...] = field(init=False)
    local_out: tuple[int, ...] = field(init=False)
    pieces: tuple[tuple[str, int, int], ...] = field(init=False)

    def __post_init__(self):
        self.lowrank = tuple(i for i, m in enumerate(self.members) if m.lowrank)
        self.dense = tuple(i for i, m in enumerate(self.members) if not m.lowrank)
        self.local_out = tuple(sum(self.segments[s].size for s in m.segments) for m in self.members)
        off = {"lowrank": 0, "dense": 0}
        pieces = []
        for i, m in enumerate(self.members):
            kind = "lowrank" if m.lowrank else "dense"
            pieces.append((kind, off[kind], self.local_out[i]))
            off[kind] += self.local_out[i]
        self.pieces = tuple(pieces)

    # ------------------------------------------------------------------ sizes of the parameters

    @property
    def ranks(self) -> list[int]:
        return [self.members[i].rank for i in self.lowrank]

    @property
    def outs(self) -> list[int]:
        return [self.local_out[i] for i in self.lowrank]

    @property
    def a_rows(self) -> int:
        """Rows of the stacked ``weight_a`` [Σ r, in_local]."""
        return sum(self.ranks)

    @property
    def b_numel(self) -> int:
        """Elements of the flat ``weight_b``: each low-rank member's [local_out, r] row-major, one after another."""
        return sum(r * m for r, m in zip(self.ranks, self.outs))

    @property
    def dense_rows(self) -> int:
        """Rows of the dense ``weight`` [Σ local_out of dense members, in_local] (0: a tombstone sink)."""
        return sum(self.local_out[i] for i in self.dense)

    @property
    def in_order(self) -> bool:
        """True when the low-rank members' concatenated output is the whole output in order (no dense member)."""
        return not self.dense

    # ------------------------------------------------------------------ where a member's tensors go

    def member_for(self, shard: Optional[tuple[int, ...]]) -> int:
        """The index of the member stored as segments ``shard`` (None: the whole Linear, fused on disk)."""
        want = tuple(range(len(self.segments))) if shard is None else tuple(shard)
        for i, m in enumerate(self.members):
            if m.segments == want:
                return i
        have = ", ".join(f"{m.name} -> segments {list(m.segments)}" for m in self.members)
        raise CheckpointError(f"{self.prefix}: a checkpoint tensor fills output segments {list(want)} of this "
                              f"{len(self.segments)}-segment Linear, which no module of quantization_config maps "
                              f"to ({have})")

    def global_rows(self, i: int) -> int:
        """Rows of member ``i`` as stored (its segments' global sizes summed)."""
        return sum(self.segments[s].global_size for s in self.members[i].segments)

    def row_slices(self, i: int) -> list[tuple[int, int]]:
        """``(start, size)`` of the stored rows of member ``i`` that this rank keeps, in output order."""
        out, base = [], 0
        for s in self.members[i].segments:
            seg = self.segments[s]
            out.append((base + seg.start, seg.size))
            base += seg.global_size
        return out

    def a_offset(self, i: int) -> int:
        """First row of low-rank member ``i`` in the stacked ``weight_a``."""
        return sum(self.members[j].rank for j in self.lowrank if j < i)

    def b_offset(self, i: int) -> int:
        """First element of low-rank member ``i`` in the flat ``weight_b``."""
        return sum(self.members[j].rank * self.local_out[j] for j in self.lowrank if j < i)

    def dense_offset(self, i: int) -> int:
        """First row of dense member ``i`` in ``weight``."""
        return sum(self.local_out[j] for j in self.dense if j < i)


def column_segments(global_sizes: Sequence[int], tp_rank: int, tp_size: int,
                    replicas: Sequence[int] | None = None) -> tuple[Segment, ...]:
    """Segments of a column-parallel Linear: segment ``s`` of ``global_sizes[s]`` rows, split over
    ``tp_size // replicas[s]`` distinct shards (``replicas`` default 1: every rank its own shard)."""
    segs = []
    for s, g in enumerate(global_sizes):
        rep = 1 if replicas is None else replicas[s]
        shards = tp_size // rep
        if g % shards:
            raise CheckpointError(f"output segment {s} of {g} rows does not split over {shards} tensor-parallel shards")
        size = g // shards
        segs.append(Segment(g, (tp_rank // rep) * size, size))
    return tuple(segs)


def full_segments(global_sizes: Sequence[int]) -> tuple[Segment, ...]:
    """Segments kept whole on every rank (row-parallel and replicated Linears)."""
    return tuple(Segment(g, 0, g) for g in global_sizes)


def members_for(prefix: str, names: Sequence[str], n_segments: int, ranks: dict[str, int]) -> tuple[Member, ...]:
    """The members of the Linear at ``prefix`` whose checkpoint modules are ``names`` (full names).

    One name per segment (``q_proj, k_proj, v_proj``), or one name for the whole Linear (a module
    fused on disk, Phi-3's ``qkv_proj``). Anything else is an architecture map obdk cannot serve.
    """
    if len(names) == n_segments:
        return tuple(Member(n, ranks.get(n), (s,)) for s, n in enumerate(names))
    if len(names) == 1:
        return (Member(names[0], ranks.get(names[0]), tuple(range(n_segments))),)
    raise CheckpointError(f"{prefix}: vLLM fuses {n_segments} outputs in this Linear but its packed_modules_mapping "
                          f"names {len(names)} checkpoint modules {list(names)}; obdk cannot tell which rows each "
                          "holds (unknown architecture mapping)")


def check_factor_headers(path: str, ranks: dict[str, int], index: dict) -> None:
    """Check each low-rank module's stored factors against its rank, from the safetensors headers.

    ``index``: tensor name → object with ``shape``, ``dtype`` and ``file`` (``obdk.io.tensor_index``).
    Raises :class:`CheckpointError` naming the module and the reason (missing factor, a rank that
    is not the factors' inner size, a factor that is not 2-D or not floating point).
    """
    for name, r in ranks.items():
        a, b = index.get(f"{name}.weight_a"), index.get(f"{name}.weight_b")
        for key, info in ((f"{name}.weight_a", a), (f"{name}.weight_b", b)):
            if info is None:
                raise CheckpointError(f"{path}: {name}: tensor {key!r} is missing (quantization_config.ranks lists "
                                      f"{name} as low-rank, rank {r})")
            if len(info.shape) != 2:
                raise CheckpointError(f"{info.file}: {name}: tensor {key!r} has shape {list(info.shape)}, not a matrix")
            dt = info.dtype
            if not getattr(dt, "is_floating_point", False):
                raise CheckpointError(f"{info.file}: {name}: tensor {key!r} is stored as {dt}, not a floating dtype")
        if a.shape[0] != r or b.shape[1] != r:
            raise CheckpointError(f"{a.file}: {name}: quantization_config.ranks says rank {r} but the stored factors "
                                  f"are weight_a {list(a.shape)} and weight_b {list(b.shape)} (corrupt rank)")
