"""Every environment variable shardserve reads, in one table, with small typed getters."""

from __future__ import annotations

import os

# name -> what it means. Nothing else in the project calls os.environ for these names.
ENV_VARS: dict[str, str] = {
    "SHARDSERVE_HOST_IP": "address this node advertises to the others (must differ per node); default 127.0.0.1",
    "SHARDSERVE_PORT": "base port for rendezvous; later ports count up from it; unset = pick free ports",
    "SHARDSERVE_PP_LAYER_PARTITION": 'layers per pipeline stage, comma-separated, e.g. "16,14"',
    "SHARDSERVE_SECRET": "launch secret shared by every node of a --nnodes launch (required there; e.g. "
                         "`openssl rand -hex 32`): authenticates the control port and the rendezvous store",
    "SHARDSERVE_TP_TRANSPORT": "CPU tensor-parallel groups whose ranks span nodes: 'auto' (default: TCP collectives "
                               "between the nodes, shared memory inside each; needs the launch secret) or 'gloo' "
                               "(torch.distributed's Gloo for every collective of such a group)",
    "SHARDSERVE_COLLECTIVES_PORT": "first TCP port of the collectives between nodes and of the pipeline stages' "
                                   "TCP links: a node's N ranks listen on it and the ports after it, up to base + "
                                   "2N - 1; unset = a free port each",
    "SHARDSERVE_HEARTBEAT_TIMEOUT": "seconds without a heartbeat before a node (or the driver) is declared lost; "
                                    "default 10",
    "SHARDSERVE_CPU_KERNELS": "float32 on the CPU: 'native' (default: C kernels for decode attention, RMSNorm, "
                              "rotary, SiLU*mul, the KV write and greedy argmax, built with gcc on first use) "
                              "or 'torch' (pure torch ops)",
    "SHARDSERVE_LOGGING_LEVEL": "level of shardserve's log lines on stderr: DEBUG, INFO (default), WARNING, ERROR",
    "SHARDSERVE_NUM_THREADS": "torch threads per rank (overrides the even split of the cores)",
    "SHARDSERVE_CPU_BIND": "CPU ranks of one node: 'auto' (default: each rank pinned to its own cores when the "
                           "ranks' threads fit on the allowed cores) or 'off' (the OS places them)",
    "CUDA_VISIBLE_DEVICES": "GPUs a worker may see (set by the executor, or by the user)",
    "LOCAL_RANK": "rank of this process on its node (torchrun)",
    "RANK": "global rank of this process (torchrun / external launcher)",
    "WORLD_SIZE": "number of processes (torchrun / external launcher)",
    "MASTER_ADDR": "rendezvous host (torchrun / external launcher)",
    "MASTER_PORT": "rendezvous port (torchrun / external launcher); shardserve's own store listens on MASTER_PORT+1",
    "LOCAL_WORLD_SIZE": "number of processes on this node (torchrun)",
    "OMPI_COMM_WORLD_RANK": "global rank under Open MPI's mpirun",
    "OMPI_COMM_WORLD_SIZE": "number of processes under Open MPI's mpirun",
    "OMPI_COMM_WORLD_LOCAL_RANK": "rank on this node under Open MPI's mpirun",
    "OMPI_COMM_WORLD_LOCAL_SIZE": "number of processes on this node under Open MPI's mpirun",
    "PMI_RANK": "global rank under MPICH / Intel MPI (PMI)",
    "PMI_SIZE": "number of processes under MPICH / Intel MPI (PMI)",
    "SHARDSERVE_RAY_COMPILED_DAG": "'1': the ray backend carries steps through a Ray compiled graph "
                                   "(ray[cgraph]); '0' (default): the default Ray path",
    "RAY_ADDRESS": "Ray cluster the ray executor joins (else a running local one via address='auto', else a new local Ray)",
    "GLOO_SOCKET_IFNAME": "interface Gloo uses; the ray executor sets it per actor to the one carrying the node's host IP",
}


def _get(name: str) -> str | None:
    """The variable's value, or None when unset or blank."""
    assert name in ENV_VARS, f"{name} is not in the env.py table; add it there"
    value = os.environ.get(name)
    if value is None or value.strip() == "":
        return None
    return value.strip()


def _get_int(name: str, *, minimum: int | None = None) -> int | None:
    value = _get(name)
    if value is None:
        return None
    try:
        out = int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r}: expected an integer") from None
    if minimum is not None and out < minimum:
        raise ValueError(f"{name}={value!r}: expected an integer >= {minimum}")
    return out


def logging_level() -> str:
    """SHARDSERVE_LOGGING_LEVEL, upper-cased; default "INFO"."""
    level = (_get("SHARDSERVE_LOGGING_LEVEL") or "INFO").upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ValueError(f"SHARDSERVE_LOGGING_LEVEL={level!r}: expected DEBUG, INFO, WARNING, ERROR or CRITICAL")
    return level


def host_ip() -> str:
    """SHARDSERVE_HOST_IP, default "127.0.0.1"."""
    return _get("SHARDSERVE_HOST_IP") or "127.0.0.1"


def base_port() -> int | None:
    """SHARDSERVE_PORT as an int in 1..65535, or None when unset."""
    port = _get_int("SHARDSERVE_PORT", minimum=1)
    if port is not None and port > 65535:
        raise ValueError(f"SHARDSERVE_PORT={port}: expected a port number in 1..65535")
    return port


def pp_layer_partition() -> list[int] | None:
    """SHARDSERVE_PP_LAYER_PARTITION parsed as e.g. "16,14" -> [16, 14]; None when unset.

    Only the form is checked here; the count and sum are checked against the model by the caller.
    """
    value = _get("SHARDSERVE_PP_LAYER_PARTITION")
    if value is None:
        return None
    try:
        parts = [int(p) for p in value.split(",")]
    except ValueError:
        raise ValueError(
            f"SHARDSERVE_PP_LAYER_PARTITION={value!r}: expected comma-separated layer counts "
            f'per pipeline stage, e.g. "16,14"'
        ) from None
    if any(p < 1 for p in parts):
        raise ValueError(
            f"SHARDSERVE_PP_LAYER_PARTITION={value!r}: every stage needs at least one layer, e.g. \"16,14\""
        )
    return parts


def launch_secret() -> bytes | None:
    """SHARDSERVE_SECRET as bytes, or None when unset; refuses secrets too short to resist guessing."""
    value = _get("SHARDSERVE_SECRET")
    if value is None:
        return None
    if len(value) < 16:
        raise ValueError("SHARDSERVE_SECRET is shorter than 16 characters; use a random one, e.g. "
                         "`export SHARDSERVE_SECRET=$(openssl rand -hex 32)`, the same on every node")
    return value.encode()


def _one_of(name: str, *allowed: str) -> str:
    """`name`'s value, case-folded: one of `allowed`, the first being the default; a ValueError names them."""
    value = (_get(name) or allowed[0]).lower()
    if value not in allowed:
        raise ValueError(f"{name}={value!r}: expected {' or '.join(repr(a) for a in allowed)}")
    return value


def tp_transport() -> str:
    """SHARDSERVE_TP_TRANSPORT: "auto" (default) or "gloo"."""
    return _one_of("SHARDSERVE_TP_TRANSPORT", "auto", "gloo")


def collectives_port() -> int | None:
    """SHARDSERVE_COLLECTIVES_PORT as an int in 1..65535, or None when unset."""
    port = _get_int("SHARDSERVE_COLLECTIVES_PORT", minimum=1)
    if port is not None and port > 65535:
        raise ValueError(f"SHARDSERVE_COLLECTIVES_PORT={port}: expected a port number in 1..65535")
    return port


def heartbeat_timeout() -> float:
    """SHARDSERVE_HEARTBEAT_TIMEOUT in seconds (default 10)."""
    value = _get("SHARDSERVE_HEARTBEAT_TIMEOUT")
    if value is None:
        return 10.0
    try:
        seconds = float(value)
    except ValueError:
        raise ValueError(f"SHARDSERVE_HEARTBEAT_TIMEOUT={value!r}: expected a number of seconds") from None
    if seconds < 2:
        raise ValueError(f"SHARDSERVE_HEARTBEAT_TIMEOUT={value!r}: expected at least 2 seconds (heartbeats are 1 s apart)")
    return seconds


def ray_compiled_dag() -> bool:
    """SHARDSERVE_RAY_COMPILED_DAG: "1" selects the Ray compiled-graph executor, "0" (default) the default one."""
    return _one_of("SHARDSERVE_RAY_COMPILED_DAG", "0", "1") == "1"


def cpu_kernels() -> str:
    """SHARDSERVE_CPU_KERNELS: "native" (default) or "torch"."""
    return _one_of("SHARDSERVE_CPU_KERNELS", "native", "torch")


def cpu_bind() -> str:
    """SHARDSERVE_CPU_BIND: "auto" (default) or "off"."""
    return _one_of("SHARDSERVE_CPU_BIND", "auto", "off")


def threads_override() -> int | None:
    """SHARDSERVE_NUM_THREADS (torch threads per rank), or None when unset."""
    return _get_int("SHARDSERVE_NUM_THREADS", minimum=1)


def launcher_rank() -> tuple[int, int, int] | None:
    """(rank, world_size, local_rank) set by torchrun (RANK/WORLD_SIZE/LOCAL_RANK) or mpirun
    (OMPI_COMM_WORLD_* or PMI_*), or None when no launcher set them. local_rank defaults to rank."""
    for rank_var, size_var, local_var in (
        ("RANK", "WORLD_SIZE", "LOCAL_RANK"),
        ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
        ("PMI_RANK", "PMI_SIZE", None),
    ):
        rank = _get_int(rank_var, minimum=0)
        size = _get_int(size_var, minimum=1)
        if rank is None or size is None:
            continue
        local = _get_int(local_var, minimum=0) if local_var else None
        if rank >= size:
            raise ValueError(f"{rank_var}={rank} must be < {size_var}={size}")
        return rank, size, rank if local is None else local
    return None


def master_addr() -> str | None:
    """MASTER_ADDR (the rendezvous host, rank 0's node), or None when unset."""
    return _get("MASTER_ADDR")


def master_port() -> int | None:
    """MASTER_PORT as an int in 1..65535, or None when unset."""
    port = _get_int("MASTER_PORT", minimum=1)
    if port is not None and port > 65535:
        raise ValueError(f"MASTER_PORT={port}: expected a port number in 1..65535")
    return port


def launcher_local_world_size() -> int | None:
    """Processes on this node: LOCAL_WORLD_SIZE (torchrun) or OMPI_COMM_WORLD_LOCAL_SIZE (mpirun); None if unset."""
    for name in ("LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE"):
        value = _get_int(name, minimum=1)
        if value is not None:
            return value
    return None
