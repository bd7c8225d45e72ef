"""Collectives with verb names: the group is passed in, and 1-member groups return immediately."""

from __future__ import annotations

import torch
import torch.distributed as dist

from shardserve.distributed.parallel_state import ParallelGroup
from shardserve.distributed.shm_comm import SHM_DTYPES

# dtype <-> small integer code for the send_tensors header (append only: codes are the wire format).
_DTYPES: list[torch.dtype] = [
    torch.float32, torch.float16, torch.bfloat16, torch.float64,
    torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool,
]
_DTYPE_CODE = {d: i for i, d in enumerate(_DTYPES)}
_HEADER_LEN = 64  # int64 words (512 bytes) in the first header message; longer headers send the rest separately


def _fast(x: torch.Tensor, group: ParallelGroup):
    """The group's own communicator for x (shared memory on one node, TCP + shared memory across nodes), or None
    for torch.distributed. Every member takes the same path: dtype and device are the same on all ranks."""
    if x.device.type != "cpu" or x.dtype not in SHM_DTYPES:
        return None
    return group.shm or group.net


def all_reduce(x: torch.Tensor, group: ParallelGroup) -> torch.Tensor:
    """Sum of x over the group, bit-identical on every member.

    x is consumed: its storage may hold the result. On the shared-memory path the sum is taken in
    rank order ((x0 + x1) + x2) + ... (large tensors in slot-sized chunks), and so it is on the TCP path
    across nodes (tcp_collectives.py): the same bits whichever transport.
    """
    if group.size == 1:
        return x
    if (fast := _fast(x, group)) is not None:
        return fast.all_reduce(x)
    x = x.contiguous()
    dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group.group)
    return x


def all_gather(x: torch.Tensor, group: ParallelGroup, dim: int = -1) -> torch.Tensor:
    """Concatenation along `dim` of every member's x, in group order.

    Requirement: every member passes a tensor of the same shape and dtype (pad ragged shards first).
    """
    if group.size == 1:
        return x
    if (fast := _fast(x, group)) is not None:
        return fast.all_gather(x, dim)
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(group.size)]
    dist.all_gather(parts, x, group=group.group)
    return torch.cat(parts, dim=dim)


def gather_to_first(x: torch.Tensor, group: ParallelGroup, dim: int = -1) -> torch.Tensor | None:
    """Like all_gather, but only the first member (rank_in_group 0) gets the result; others get None.
    Same equal-shape requirement."""
    if group.size == 1:
        return x
    if (fast := _fast(x, group)) is not None:
        return fast.all_gather(x, dim, first_only=True)
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(group.size)] if group.is_first else None
    dist.gather(x, parts, dst=group.ranks[0], group=group.group)
    return torch.cat(parts, dim=dim) if parts is not None else None


def barrier(group: ParallelGroup) -> None:
    """Return once every member has called barrier(group)."""
    if group.size == 1:
        return
    fast = group.shm or group.net
    if fast is not None:
        fast.barrier()
    else:
        dist.barrier(group=group.group)


def _wire_device(group: ParallelGroup) -> torch.device:
    """Where header tensors live: NCCL moves only CUDA tensors, Gloo CPU ones."""
    if group.group is not None and dist.get_backend(group.group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _as_wire(t: torch.Tensor) -> torch.Tensor:
    """Gloo has no bool: move bool tensors as uint8 views of the same storage."""
    return t.view(torch.uint8) if t.dtype == torch.bool else t


def send_tensors(tensors: dict[str, torch.Tensor], dst: int, group: ParallelGroup) -> None:
    """Send a dict of tensors to global rank `dst` (a member of `group`), e.g. between PP stages.

    Wire format: an int64 header [total_len, n, then per tensor: dtype code, ndim, *shape, len(name),
    *name utf-8 bytes], padded to _HEADER_LEN (the remainder, if any, follows as a second message),
    then each non-empty tensor's contiguous data in dict order. No pickling. Messages between one
    (src, dst) pair arrive in the order they were sent.
    """
    words: list[int] = [0, len(tensors)]
    for name, t in tensors.items():
        if t.dtype not in _DTYPE_CODE:
            raise TypeError(f"send_tensors: unsupported dtype {t.dtype} for {name!r}")
        encoded = name.encode()
        words += [_DTYPE_CODE[t.dtype], t.dim(), *t.shape, len(encoded), *encoded]
    words[0] = len(words)
    header = torch.zeros(max(_HEADER_LEN, len(words)), dtype=torch.int64)
    header[: len(words)] = torch.tensor(words, dtype=torch.int64)
    if (link := group.links.get(dst)) is not None:      # a neighbouring stage on another node: its TCP link
        _send_on_link(link, header, tensors.values())
        return
    header = header.to(_wire_device(group))
    dist.send(header[:_HEADER_LEN], dst=dst, group=group.group)
    if len(words) > _HEADER_LEN:
        dist.send(header[_HEADER_LEN:].contiguous(), dst=dst, group=group.group)
    for t in tensors.values():
        if t.numel() > 0:  # empty tensors travel in the header only
            dist.send(_as_wire(t.contiguous()), dst=dst, group=group.group)


def recv_tensors(src: int, group: ParallelGroup, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Receive what send_tensors sent from global rank `src`; tensors are returned on `device`."""
    link = group.links.get(src)
    wire = torch.device("cpu") if link is not None else _wire_device(group)

    def receive(*ts: torch.Tensor) -> None:
        if link is not None:                            # one message for them all
            link.exchange([], [(1 - link.index, [_byte_view(t) for t in ts])])
        else:
            for t in ts:
                dist.recv(_as_wire(t), src=src, group=group.group)

    head = torch.empty(_HEADER_LEN, dtype=torch.int64, device=wire)
    receive(head)
    words = head.tolist()
    if words[0] > _HEADER_LEN:
        rest = torch.empty(words[0] - _HEADER_LEN, dtype=torch.int64, device=wire)
        receive(rest)
        words += rest.tolist()
    out: dict[str, torch.Tensor] = {}
    pos = 2
    for _ in range(words[1]):
        dtype, ndim = _DTYPES[words[pos]], words[pos + 1]
        shape = words[pos + 2: pos + 2 + ndim]
        pos += 2 + ndim
        name_len = words[pos]
        name = bytes(words[pos + 1: pos + 1 + name_len]).decode()
        pos += 1 + name_len
        out[name] = torch.empty(shape, dtype=dtype, device=wire)
    filled = [t for t in out.values() if t.numel() > 0]   # empty tensors travel in the header only
    if filled:
        receive(*filled)
    return {name: t.to(device) for name, t in out.items()}


def _send_on_link(link, header: torch.Tensor, tensors) -> None:
    """send_tensors' messages on a PP link, as recv_tensors receives them: the fixed header, the rest of a
    longer one, then every non-empty tensor in one message (sent at once when they fit the socket buffers)."""
    peer = 1 - link.index
    link.exchange([(peer, [_byte_view(header[:_HEADER_LEN])])], [])
    if len(header) > _HEADER_LEN:
        link.exchange([(peer, [_byte_view(header[_HEADER_LEN:])])], [])
    filled = [_byte_view(t.contiguous()) for t in tensors if t.numel() > 0]
    if filled:
        link.exchange([(peer, filled)], [])


def _byte_view(t: torch.Tensor):
    """A contiguous CPU tensor's memory as a numpy uint8 buffer (sent from / received into in place)."""
    return t.reshape(-1).view(torch.uint8).numpy()
