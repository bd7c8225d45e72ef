"""Worker: one per rank. Joins the process groups, loads its model shard, owns its KV cache, runs steps.

Its public methods are the RPC surface the executors call (collective_rpc by method name).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from shardserve.config import EngineConfig, layer_ranges
from shardserve.core.outputs import ModelRunnerOutput, SchedulerOutput
from shardserve.distributed import env
from shardserve.distributed.comm import recv_tensors, send_tensors
from shardserve.distributed.control_server import SecureStore
from shardserve.distributed.parallel_state import (ParallelContext, destroy_parallel_context,
                                                   init_parallel_context)
from shardserve.model.loader import load_model
from shardserve.worker.cpu_binding import bind_rank
from shardserve.worker.malloc_tuning import keep_freed_memory
from shardserve.worker.model_runner import ModelRunner


@dataclass(frozen=True)
class DistInit:
    """Where and how this rank joins the others."""
    rank: int = 0
    local_rank: int = 0
    local_world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 0
    launch_id: str = ""
    timeout_s: float = 300.0
    host_id: str = ""                 # node identity for shared-memory TP (Ray: the advertised host IP)
    secret: bytes = b""               # launch secret for the driver's authenticated store; empty: plain TCPStore
    reply_to_driver: bool = False     # answer on its own connection to the driver's control port, not via its
    #                                   node's agent (the output rank on another node: one relay less per step)
    commands_from_driver: bool = False  # also take commands on that connection (needs reply_to_driver), not
    #                                     from the node's ring (the one rank of a node: no relay through the agent)


class Worker:
    def __init__(self, config: EngineConfig, dist_init: DistInit = DistInit()):
        self.config, self.dist_init = config, dist_init
        self.ctx: ParallelContext | None = None
        self.runner: ModelRunner | None = None

    # ---- start-up -----------------------------------------------------------------------------------
    def init_device(self) -> None:
        par, d = self.config.parallel, self.dist_init
        threads = par.rank_threads(d.local_world_size)
        device = torch.device("cuda", d.local_rank) if par.device == "cuda" else torch.device("cpu")
        if device.type == "cpu":
            keep_freed_memory()
            bind_rank(d.local_rank, d.local_world_size, threads)     # before torch starts its threads
        torch.set_num_threads(threads)
        if par.world_size == 1:
            self.ctx = ParallelContext.single(device)
        else:
            store = SecureStore(d.master_addr, d.master_port, d.secret, d.timeout_s) if d.secret else None
            self.ctx = init_parallel_context(d.rank, par.world_size, par.tensor_parallel_size,
                                             par.pipeline_parallel_size, master_addr=d.master_addr,
                                             master_port=d.master_port, device=device, launch_id=d.launch_id,
                                             timeout_s=d.timeout_s, host_id=d.host_id, store=store,
                                             secret=d.secret or env.launch_secret() or b"")

    def load_model(self) -> None:
        mc = self.config.model
        layer_range = layer_ranges(mc.spec.num_layers, self.config.parallel.pipeline_parallel_size)[self.ctx.pp_rank]
        torch.manual_seed(mc.seed)
        model = load_model(mc.spec, self.ctx, layer_range, mc.dtype, mc.quantization)
        self.runner = ModelRunner(model, self.config.cache.block_size, self.ctx.device, mc.dtype,
                                  mc.spec.eos_token_ids)

    def num_available_blocks(self) -> int:
        """How many KV blocks this rank can hold (the executor takes the minimum over ranks)."""
        cache, sched = self.config.cache, self.config.scheduler
        if cache.kv_cache_memory is None and self.ctx.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.ctx.device)
            budget = int(free * cache.memory_fraction)
        else:
            budget = kv_cache_budget(cache, self.dist_init.local_world_size, _available_ram())
        in_flight = self.config.parallel.pipeline_parallel_size     # one batch of max_num_seqs per stage
        useful = in_flight * sched.max_num_seqs * -(-sched.max_model_len // cache.block_size) + 1
        return max(0, min(budget // max(self.runner.kv_bytes_per_block(), 1), useful))

    def init_cache(self, num_blocks: int) -> int:
        """Allocate the KV cache; returns its bytes on this rank. A cache sized by kv_cache_memory (memory the user
        reserved) or on a GPU is zeroed now; the CPU default is a ceiling whose pages fault in as they are used."""
        cache = self.config.cache
        return self.runner.init_cache(num_blocks, zero=cache.kv_cache_memory is not None
                                      or self.ctx.device.type != "cpu")

    # ---- steps --------------------------------------------------------------------------------------
    def execute_model(self, sched: SchedulerOutput) -> ModelRunnerOutput | None:
        """Run this stage on the batch; the last stage's tp_rank 0 returns the sampled tokens."""
        ctx = self.ctx
        intermediate = None if ctx.pp.is_first else recv_tensors(ctx.pp.prev_rank, ctx.pp, ctx.device)
        out = self.execute_stage(sched, intermediate)
        if not ctx.pp.is_last:
            send_tensors(out, ctx.pp.next_rank, ctx.pp)
            return None
        return out

    def execute_stage(self, sched: SchedulerOutput, intermediate: dict[str, torch.Tensor] | None
                      ) -> ModelRunnerOutput | dict[str, torch.Tensor] | None:
        """execute_model with the pipeline hand-off passed in and returned instead of received and sent (Ray
        compiled graphs carry it): the previous stage's {"hidden_states", "residual"} ([num_tokens, hidden]; None
        on the first stage) in; this stage's hand-off out before the last stage, else as execute_model."""
        ctx = self.ctx
        if intermediate is not None:
            intermediate = {name: t.to(ctx.device) for name, t in intermediate.items()}
        out = self.runner.execute(sched, intermediate, sample_here=ctx.tp.is_first)
        if not ctx.pp.is_last:
            return out
        return out if ctx.tp.is_first else None

    def check_health(self) -> bool:
        return True

    def tp_transport(self) -> str:
        """How this rank's TP group moves tensors: "none" (tp=1), "shm" (one node), "tcp" (TCP collectives
        across nodes, plus shared memory where a node holds several members: "tcp+shm") or the torch backend."""
        tp = self.ctx.tp
        if tp.size == 1:
            return "none"
        if tp.shm is not None:
            return "shm"
        if tp.net is not None:
            return "tcp+shm" if tp.net.team is not None else "tcp"
        return tp.group and torch.distributed.get_backend(tp.group) or "none"

    def pp_transport(self) -> str:
        """How this rank's PP hand-offs travel: "none" (pp=1), "tcp" (TCP links) or the torch backend."""
        pp = self.ctx.pp
        if pp.size == 1:
            return "none"
        return "tcp" if pp.links else torch.distributed.get_backend(pp.group)

    def memory_stats(self) -> dict:
        """This rank's weight bytes (prepacked copies and the LM head's bf16 screen included) and peak resident
        memory so far."""
        model = self.runner.model
        seen: set[int] = set()                          # tied weights share storage: count it once
        weights = 0
        for p in model.parameters():
            if p.untyped_storage().data_ptr() not in seen:
                seen.add(p.untyped_storage().data_ptr())
                weights += p.numel() * p.element_size()
        for m in model.modules():
            if hasattr(m, "method"):
                weights += m.method.extra_bytes(m)
            screen = getattr(getattr(m, "screen", None), "weight_bf16", None)
            weights += 0 if screen is None else screen.numel() * screen.element_size()
        return {"rank": self.dist_init.rank, "weight_bytes": weights, "peak_rss_bytes": _status_bytes("VmHWM"),
                "rss_bytes": _status_bytes("VmRSS")}

    def startup_stats(self) -> dict:
        """What this rank's start-up read and imported: GGUF metadata parses (0 where the driver's spec, tensor
        table included, sufficed) and whether transformers got imported."""
        import sys
        from shardserve.model import gguf_metadata
        return {"rank": self.dist_init.rank, "gguf_metadata_parses": gguf_metadata.parse_count,
                "transformers_imported": "transformers" in sys.modules}

    def weight_formats(self) -> dict[str, str]:
        """Each linear layer of this rank -> the format its weight is held in ("Q4_K", "I8", "PanelF32", ...)."""
        return {name: m.method.format if m.method.format != "dense" else type(m.method).__name__.removesuffix("Method")
                for name, m in self.runner.model.named_modules() if hasattr(m, "method")}

    def shutdown(self) -> None:
        if self.ctx is not None:
            destroy_parallel_context(self.ctx)
            self.ctx = None


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def kv_cache_budget(cache, local_ranks: int, available_ram: int) -> int:
    """KV-cache bytes per rank on the CPU: kv_cache_memory when set, else this rank's share of the node's default,
    min(cpu_memory_fraction of available RAM, cpu_kv_cache_cap)."""
    if cache.kv_cache_memory is not None:
        return cache.kv_cache_memory
    return int(min(available_ram * cache.cpu_memory_fraction, cache.cpu_kv_cache_cap) / local_ranks)


def _available_ram() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
