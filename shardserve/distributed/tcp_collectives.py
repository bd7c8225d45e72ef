"""All-reduce, all-gather, gather and barrier for a CPU group whose members span hosts: latency-bound algorithms
over persistent TCP connections (tcp_mesh.py), with a shared-memory team per host when a host holds several.

Who talks: each host's members form a team (one ShmCommunicator) whose first member, the leader, represents
them on the network; a host whose segment could not be made has each member on the network itself. The mesh
connects the participants (leaders and lone members), full mesh.

Algorithms, by size (m = bytes per member, P participants):
- gather rows: every participant ends with every member's x, in group order. P = 2^k > 2 with equal
  teams: recursive doubling (k rounds, each exchanging all rows held so far); otherwise one direct round (each
  sends its rows to every other participant: one round trip's latency for two participants).
- all_reduce, m <= LARGE_BYTES: gather rows, then sum in group order (two lone members: one swap, then add).
- all_reduce, larger (P > 2 or teams): reduce-scatter by direct exchange (participant p receives chunk p of every
  member's x and sums it in group order), then the reduced chunks are gathered. Per participant this moves the
  bytes a ring does, 2 (P-1)/P x m plus its team's extra rows, in 2 rounds instead of 2 (P-1).
Every sum is ((x0 + x1) + x2) + ... in group order, the order of the shared-memory path: every member gets the
same bits, whatever the layout, transport or size.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from shardserve.distributed.shm_comm import SHM_SUPPORTED, ShmCommunicator, ShmUnavailable
from shardserve.distributed.tcp_mesh import TcpMesh

LARGE_BYTES = 64 * 1024      # above this, all_reduce moves chunks (reduce-scatter + gather) instead of whole rows


def _bytes(t: torch.Tensor):
    """Contiguous t's memory as a buffer object (a numpy view: sent from / received into in place)."""
    return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()


class TcpCommunicator:
    """The group's collectives across hosts. `rows[q]` lists the group ranks participant q represents (its
    team); `me` is this member's group rank. Only team leaders hold a mesh (its index is their participant)."""

    def __init__(self, me: int, rows: list[list[int]], mesh: TcpMesh | None, team: ShmCommunicator | None) -> None:
        self.me, self.rows, self.mesh, self.team = me, rows, mesh, team
        self.size = sum(len(r) for r in rows)
        self.part = next(q for q, r in enumerate(rows) if me in r)
        self.leader = rows[self.part][0] == me
        order = [g for r in rows for g in r]              # staged row i holds member order[i]
        self.pos = [order.index(g) for g in range(self.size)]   # member g's row in a staged buffer
        self.first_row = [sum(len(r) for r in rows[:q]) for q in range(len(rows))]
        self._pair = None if self.size != 2 or len(rows) != 2 else 1 - self.part   # two lone members: the peer
        self._scratch: dict[tuple, tuple[torch.Tensor, object]] = {}
        self._doubling = (len(rows) > 2 and len({len(r) for r in rows}) == 1
                          and len(rows) & (len(rows) - 1) == 0)

    # ---------------------------------------------------------------- building blocks

    def _local_rows(self, flat: torch.Tensor) -> torch.Tensor | None:
        """Leader: [team size, m], the team's x gathered over shared memory ([1, m] without a team); others None."""
        return self.team.all_gather(flat.view(1, -1), dim=0, first_only=True) if self.team is not None \
            else flat.view(1, -1)

    def _gather_rows(self, local: torch.Tensor, to_first: bool = False) -> torch.Tensor | None:
        """Leader: [size, m] every member's x, staged (member g in row pos[g]); others None."""
        if not self.leader:
            return None
        m, nparts, q = local.shape[1], len(self.rows), self.part
        staged = torch.empty((self.size, m), dtype=local.dtype)
        mine = staged[self.first_row[q]:self.first_row[q] + len(self.rows[q])]
        mine.copy_(local)

        def block(p: int, count: int = 1) -> torch.Tensor:
            end = self.first_row[p + count] if p + count < nparts else self.size
            return staged[self.first_row[p]:end]
        if to_first:
            if q == 0:
                self.mesh.exchange([], [(p, [_bytes(block(p))]) for p in range(1, nparts)])
            else:
                self.mesh.exchange([(0, [_bytes(mine)])], [])
        elif self._doubling:
            for i in range(int(math.log2(nparts))):
                span = 1 << i
                partner, start, pstart = q ^ span, (q >> i) << i, ((q ^ span) >> i) << i
                self.mesh.exchange([(partner, [_bytes(block(start, span))])],
                                   [(partner, [_bytes(block(pstart, span))])])
        else:
            others = [p for p in range(nparts) if p != q]
            self.mesh.exchange([(p, [_bytes(mine)]) for p in others], [(p, [_bytes(block(p))]) for p in others])
        return staged

    def _sum_rows(self, staged: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """out = ((row of member 0 + member 1) + member 2) + ..., rows [size, *] staged."""
        rows = [staged[self.pos[g]] for g in range(self.size)]
        torch.add(rows[0], rows[1], out=out)
        for r in rows[2:]:
            out.add_(r)
        return out

    # ---------------------------------------------------------------- collectives

    def _abort(self, exc: BaseException) -> None:
        """A failure here (a dead team member included) closes the mesh, so the other hosts fail at once too."""
        if self.mesh is not None:
            self.mesh.abort(exc)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of x over the group, in group order, bit-identical on every member. x is consumed (holds the result
        when contiguous) and returned."""
        try:
            return self._all_reduce(x)
        except BaseException as exc:
            self._abort(exc)
            raise

    def _all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        out = x if x.is_contiguous() else x.contiguous()
        if self._pair is not None:          # one round trip: swap, then x0 + x1 (addition commutes: same bits)
            other, other_buf = self._scratch_for(out)
            self.mesh.swap(self._pair, _bytes(out), other_buf)
            return torch.add(out, other, out=out)
        flat = out.view(-1)
        local = self._local_rows(flat)
        if self.leader:
            if flat.numel() * flat.element_size() <= LARGE_BYTES:
                self._sum_rows(self._gather_rows(local), flat)
            else:
                self._reduce_scatter_gather(local, flat)
        if self.team is not None:
            self.team.broadcast(flat, src=0)
        return out

    def _scratch_for(self, x: torch.Tensor) -> tuple[torch.Tensor, object]:
        """A reusable tensor shaped like x (and its buffer) to receive the peer's x into."""
        key = (x.shape, x.dtype)
        got = self._scratch.get(key)
        if got is None:
            if len(self._scratch) > 32:
                self._scratch.clear()
            t = torch.empty_like(x, memory_format=torch.contiguous_format)
            got = self._scratch[key] = (t, _bytes(t))
        return got

    def _reduce_scatter_gather(self, local: torch.Tensor, flat: torch.Tensor) -> None:
        """Leader: participant p sums chunk p of every member's x (group order); then the chunks are gathered."""
        nparts, q, n = len(self.rows), self.part, flat.numel()
        bounds = [n * p // nparts for p in range(nparts + 1)]
        others = [p for p in range(nparts) if p != q]
        lo, hi = bounds[q], bounds[q + 1]
        staged = torch.empty((self.size, hi - lo), dtype=flat.dtype)      # every member's chunk q
        staged[self.first_row[q]:self.first_row[q] + len(self.rows[q])].copy_(local[:, lo:hi])
        self.mesh.exchange(            # chunk p of each of this team's rows: one contiguous slice per row
            [(p, [_bytes(row[bounds[p]:bounds[p + 1]]) for row in local]) for p in others],
            [(p, [_bytes(staged[self.first_row[p]:self.first_row[p] + len(self.rows[p])])]) for p in others])
        self._sum_rows(staged, flat[lo:hi])
        self.mesh.exchange([(p, [_bytes(flat[lo:hi])]) for p in others],
                           [(p, [_bytes(flat[bounds[p]:bounds[p + 1]])]) for p in others])

    def all_gather(self, x: torch.Tensor, dim: int = -1, *, first_only: bool = False) -> torch.Tensor | None:
        """Concatenation along `dim` of every member's x in group order (same shape and dtype everywhere).
        first_only: only group rank 0 gets it (a gather); the others return None."""
        try:
            return self._all_gather(x, dim, first_only)
        except BaseException as exc:
            self._abort(exc)
            raise

    def _all_gather(self, x: torch.Tensor, dim: int, first_only: bool) -> torch.Tensor | None:
        xc = x.contiguous()
        if self._pair is not None:                       # two lone members: one message each way (or one way)
            if first_only and self.me != 0:
                self.mesh.exchange([(self._pair, [_bytes(xc)])], [])
                return None
            other = torch.empty_like(xc)
            if first_only:
                self.mesh.exchange([], [(self._pair, [_bytes(other)])])
            else:
                self.mesh.swap(self._pair, _bytes(xc), _bytes(other))
            return torch.cat([xc, other] if self.me == 0 else [other, xc], dim=dim)
        flat = xc.view(-1)
        local = self._local_rows(flat)
        staged = self._gather_rows(local, to_first=first_only)
        if first_only:
            if self.me != 0:
                return None
        elif self.team is not None:
            if staged is None:
                staged = torch.empty((self.size, flat.numel()), dtype=flat.dtype)
            self.team.broadcast(staged, src=0)
        d = dim % max(x.dim(), 1)
        if self.pos == list(range(self.size)) and math.prod(x.shape[:d]) == 1:   # the rows are the result
            return staged.view(*x.shape[:d], self.size * x.shape[d], *x.shape[d + 1:]) if x.dim() else staged.view(-1)
        return torch.cat([staged[self.pos[g]].view(x.shape) for g in range(self.size)], dim=dim)

    def barrier(self) -> None:
        """Return once every member has called barrier()."""
        try:
            self._barrier()
        except BaseException as exc:
            self._abort(exc)
            raise

    def _barrier(self) -> None:
        if self.team is not None:
            self.team.barrier()
        if self.leader:
            others = [p for p in range(len(self.rows)) if p != self.part]
            self.mesh.exchange([(p, []) for p in others], [(p, []) for p in others])
        if self.team is not None:
            self.team.barrier()

    def close(self) -> None:
        for c in (self.mesh, self.team):
            if c is not None:
                c.close()
        self.mesh = self.team = None


def build_tcp_communicator(ranks: list[int], rank_in_group: int, hosts: list[str], store: dist.Store, *,
                           name: str, secret: bytes, listen_ip: str, timeout_s: float, port: int = 0,
                           use_shm: bool = True, shm_slot_bytes: int = 4 << 20) -> TcpCommunicator:
    """Every member of a group spanning hosts calls this with the same arguments but its own rank_in_group,
    listen_ip and port. hosts[i] names the node of member i; members of one node share a segment (a team)."""
    # a per-member call counter keeps keys apart when one name is set up twice on one store (all agree on it)
    name = f"{name}.{store.add(f'shardserve/tcpcoll/{name}/gen/{rank_in_group}', 1)}"
    teams: dict[str, list[int]] = {}
    for g, h in enumerate(hosts):
        teams.setdefault(h, []).append(g)
    host = hosts[rank_in_group]
    mine = teams[host]
    team = None
    if len(mine) > 1 and use_shm and SHM_SUPPORTED:
        try:
            team = ShmCommunicator(mine.index(rank_in_group), len(mine), store, name=f"{name}-h{mine[0]}",
                                   slot_bytes=shm_slot_bytes, timeout_s=timeout_s)
        except ShmUnavailable:
            team = None                                   # raised on every member of the team alike
        if rank_in_group == mine[0]:
            store.set(f"shardserve/tcpcoll/{name}/team/{mine[0]}", "1" if team is not None else "0")
    rows: list[list[int]] = []
    for members in teams.values():
        if len(members) > 1 and use_shm and SHM_SUPPORTED and \
                store.get(f"shardserve/tcpcoll/{name}/team/{members[0]}") == b"1":
            rows.append(members)
        else:
            rows.extend([g] for g in members)
    rows.sort()
    me_part = next(q for q, r in enumerate(rows) if rank_in_group in r)
    mesh = None
    if rows[me_part][0] == rank_in_group:
        try:
            mesh = TcpMesh(me_part, len(rows), store, name, host=listen_ip, secret=secret, timeout_s=timeout_s,
                           port=port, node=host, labels=[f"rank {ranks[r[0]]}" for r in rows])
        except BaseException:
            if team is not None:
                team.close()
            raise
    return TcpCommunicator(rank_in_group, rows, mesh, team)
