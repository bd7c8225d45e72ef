"""Rank groups for tensor and pipeline parallelism, as objects passed around (no module globals)."""

from __future__ import annotations

import datetime
import socket
import warnings
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from shardserve.distributed import env
from shardserve.distributed.shm_comm import DEFAULT_SLOT_BYTES, SHM_SUPPORTED, ShmCommunicator, ShmUnavailable
from shardserve.distributed.tcp_collectives import TcpCommunicator, build_tcp_communicator
from shardserve.distributed.tcp_mesh import TcpMesh
from shardserve.distributed.netif import listen_ip


def build_groups(world_size: int, tp: int, pp: int) -> tuple[list[list[int]], list[list[int]]]:
    """(tp_groups, pp_groups) of global ranks: ranks = arange(world).reshape(pp, tp); TP groups are
    the rows, PP groups the columns, so rank = pp_rank * tp + tp_rank.

    build_groups(4, 2, 2) == ([[0, 1], [2, 3]], [[0, 2], [1, 3]])
    """
    if tp < 1 or pp < 1:
        raise ValueError(f"tensor_parallel_size={tp} and pipeline_parallel_size={pp} must both be >= 1")
    if world_size != tp * pp:
        raise ValueError(
            f"world_size={world_size} must equal tensor_parallel_size * pipeline_parallel_size = {tp} * {pp}"
        )
    tp_groups = [[p * tp + t for t in range(tp)] for p in range(pp)]
    pp_groups = [[p * tp + t for p in range(pp)] for t in range(tp)]
    return tp_groups, pp_groups


@dataclass
class ParallelGroup:
    """This rank's view of one group: its members (global ranks), its position, and how to talk to them."""

    ranks: list[int]  # global ranks, in group order
    rank_in_group: int
    group: dist.ProcessGroup | None = None  # None when size == 1
    shm: ShmCommunicator | None = field(default=None, repr=False)  # CPU ranks on one node only
    net: TcpCommunicator | None = field(default=None, repr=False)  # CPU ranks on several nodes (TCP + shm teams)
    links: dict[int, TcpMesh] = field(default_factory=dict, repr=False)  # PP: neighbouring stage's rank -> TCP link

    def __post_init__(self) -> None:
        if not 0 <= self.rank_in_group < len(self.ranks):
            raise ValueError(f"rank_in_group={self.rank_in_group} out of range for ranks {self.ranks}")

    @classmethod
    def single(cls, rank: int = 0) -> ParallelGroup:
        """A one-member group (collectives on it return immediately)."""
        return cls(ranks=[rank], rank_in_group=0)

    @property
    def size(self) -> int:
        return len(self.ranks)

    @property
    def rank(self) -> int:
        """This process's global rank."""
        return self.ranks[self.rank_in_group]

    @property
    def is_first(self) -> bool:
        return self.rank_in_group == 0

    @property
    def is_last(self) -> bool:
        return self.rank_in_group == self.size - 1

    @property
    def prev_rank(self) -> int | None:
        """Global rank of the previous member (previous PP stage), None on the first."""
        return None if self.is_first else self.ranks[self.rank_in_group - 1]

    @property
    def next_rank(self) -> int | None:
        """Global rank of the next member (next PP stage), None on the last."""
        return None if self.is_last else self.ranks[self.rank_in_group + 1]


@dataclass
class ParallelContext:
    """Everything a worker needs to know about parallelism: its TP group, its PP group, where it runs."""

    tp: ParallelGroup
    pp: ParallelGroup
    rank: int
    world_size: int
    device: torch.device

    @classmethod
    def single(cls, device: torch.device | str = "cpu") -> ParallelContext:
        """One process, no torch.distributed at all."""
        return cls(ParallelGroup.single(), ParallelGroup.single(), 0, 1, torch.device(device))

    @property
    def tp_rank(self) -> int:
        return self.tp.rank_in_group

    @property
    def pp_rank(self) -> int:
        return self.pp.rank_in_group


def create_store(host: str, port: int, world_size: int, timeout_s: float = 300) -> dist.TCPStore:
    """The master TCPStore, created by the driver BEFORE it starts the workers (rendezvous then takes
    milliseconds). port=0 picks a free port: read it back as `store.port`. world_size is the number
    of worker ranks that will connect (informational: the store does not wait for them)."""
    del world_size  # the store never waits for workers; kept so callers state the intent
    return dist.TCPStore(
        host, port, None, True, timeout=datetime.timedelta(seconds=timeout_s), wait_for_workers=False
    )


def init_parallel_context(
    rank: int,
    world_size: int,
    tp: int,
    pp: int,
    *,
    master_addr: str,
    master_port: int,
    backend: str | None = None,
    device: torch.device | None = None,
    store: dist.Store | None = None,
    launch_id: str = "",
    use_shm: bool = True,
    timeout_s: float = 300,
    shm_slot_bytes: int = DEFAULT_SLOT_BYTES,
    host_id: str = "",
    secret: bytes = b"",
) -> ParallelContext:
    """Join the process group and build this rank's TP and PP groups.

    Every rank of the world calls this with the same (world_size, tp, pp). Without `store`, a TCPStore
    client connects to master_addr:master_port (the driver's `create_store`). CPU TP groups whose
    members all run on this host get a shared-memory communicator when use_shm is set (x86 only);
    `launch_id` (unique per launch) names its segment. CPU PP hand-offs take TCP links (_pp_links) when a
    secret is given, else torch.distributed (as on CUDA).
    `host_id` names this node (e.g. its advertised host IP); default: hostname plus boot id.
    CPU TP groups whose members span nodes use TCP collectives (tcp_collectives.py: persistent connections
    authenticated with `secret`, shared-memory teams inside each node) when a secret is given and
    SHARDSERVE_TP_TRANSPORT is not "gloo"; their ranks listen on host_id when it is an IP address.
    """
    tp_groups, pp_groups = build_groups(world_size, tp, pp)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} out of range for world_size {world_size}")
    device = torch.device("cpu") if device is None else torch.device(device)
    if backend is None:
        backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    timeout = datetime.timedelta(seconds=timeout_s)
    if store is None:
        store = dist.TCPStore(master_addr, master_port, None, False, timeout=timeout)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)

    # new_group is collective over the world: every rank creates every group, in the same order.
    def make(groups: list[list[int]]) -> ParallelGroup:
        mine = None
        for ranks in groups:
            pg = dist.new_group(ranks) if len(ranks) > 1 else None
            if rank in ranks:
                mine = ParallelGroup(ranks=ranks, rank_in_group=ranks.index(rank), group=pg)
        assert mine is not None
        return mine

    tp_group, pp_group = make(tp_groups), make(pp_groups)

    cross_host = bool(secret) and env.tp_transport() == "auto"
    tp_fast = tp_group.size > 1 and (use_shm and SHM_SUPPORTED or cross_host)
    pp_tcp = pp_group.size > 1 and bool(secret)            # CPU PP hand-offs: TCP links (any node), never Gloo
    if device.type == "cpu" and (tp_fast or pp_tcp):     # the same on every rank: all publish their node
        prefix = f"shardserve/{launch_id}"
        store.set(f"{prefix}/host/{rank}", host_id or _host_id())
        node_of = [store.get(f"{prefix}/host/{r}").decode() for r in range(world_size)]   # every rank's node
        port = env.collectives_port()
        # SHARDSERVE_COLLECTIVES_PORT: a node's ranks listen on base + their place among the node's ranks (TP),
        # then base + the node's rank count + that place (the link to the next PP stage)
        mine = [r for r in range(world_size) if node_of[r] == node_of[rank]]
        hosts = [node_of[r] for r in tp_group.ranks]
        if tp_fast and len(set(hosts)) == 1 and use_shm and SHM_SUPPORTED:
            try:
                tp_group.shm = ShmCommunicator(
                    tp_group.rank_in_group,
                    tp_group.size,
                    store,
                    name=f"{launch_id or 'x'}-tp{tp_group.ranks[0]}",
                    slot_bytes=shm_slot_bytes,
                    timeout_s=timeout_s,
                )
            except ShmUnavailable as exc:  # raised on every member alike: all fall back to torch.distributed
                warnings.warn(f"shared-memory collectives disabled, using {backend}: {exc}", stacklevel=2)
        elif tp_fast and len(set(hosts)) > 1 and cross_host:
            tp_group.net = build_tcp_communicator(
                tp_group.ranks, tp_group.rank_in_group, hosts, store, name=f"{launch_id or 'x'}-tp{tp_group.ranks[0]}",
                secret=secret, listen_ip=listen_ip(host_id, master_addr), timeout_s=timeout_s,
                port=port + mine.index(rank) if port is not None else 0, use_shm=use_shm,
                shm_slot_bytes=shm_slot_bytes)
        if pp_tcp:
            pp_group.links = _pp_links(pp_group, node_of[rank], store, name=launch_id or "x", secret=secret,
                                       listen_addr=listen_ip(host_id, master_addr), timeout_s=timeout_s,
                                       port=port + len(mine) + mine.index(rank) if port is not None else 0)
    return ParallelContext(tp=tp_group, pp=pp_group, rank=rank, world_size=world_size, device=device)


def _pp_links(pp: ParallelGroup, node: str, store: dist.Store, *, name: str, secret: bytes, listen_addr: str,
              timeout_s: float, port: int) -> dict[int, TcpMesh]:
    """TCP links to this rank's neighbouring stages, for the PP hand-offs (send_tensors), keyed by their global
    rank: one round trip's latency where Gloo's send/recv costs several (on one node too). A link is a two-member
    TcpMesh, the earlier stage first (it listens, on `port` when given; the later one connects); both ends make
    their calls on it in the same order. Built previous stage first: a stage's set-up waits only on stages before
    it."""
    links: dict[int, TcpMesh] = {}
    me = pp.rank
    for other, earlier in ((pp.prev_rank, False), (pp.next_rank, True)):
        if other is None:
            continue
        first, second = (me, other) if earlier else (other, me)
        links[other] = TcpMesh(0 if earlier else 1, 2, store, f"{name}-pp{first}-{second}", host=listen_addr,
                               secret=secret, timeout_s=timeout_s, port=port if earlier else 0, node=node,
                               labels=[f"rank {first}", f"rank {second}"])
    return links


def destroy_parallel_context(ctx: ParallelContext) -> None:
    """Close shared-memory segments and tear down torch.distributed (safe on ParallelContext.single())."""
    for g in (ctx.tp, ctx.pp):
        for c in (g.shm, g.net, *g.links.values()):
            if c is not None:
                c.close()
        g.shm = g.net = None
        g.links = {}
        g.group = None
    if dist.is_initialized():
        dist.destroy_process_group()


def _host_id() -> str:
    """Identifies this node (and its /dev/shm): hostname plus boot id where available."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"
