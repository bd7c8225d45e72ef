"""Ray executor: Ray places the ranks, the engine drives them exactly as with --nnodes.

Ray reserves one bundle per rank and starts a RankActor in each (ray_placement). The driver then spawns its
own node's ranks itself, and on every other node the first actor runs that node's agent, which joins the
driver's authenticated control port and spawns its node's ranks. Steps and replies then travel as with
--nnodes: one message per remote node per step into that node's shared-memory ring, never a Ray call per
rank; collectives stay on torch.distributed (and the TCP mesh across hosts). A dead rank, agent or node is
seen through the agent's reports and heartbeats. With SHARDSERVE_RAY_COMPILED_DAG=1 a Ray compiled graph
carries the steps instead (ray_compiled_dag).
"""
from __future__ import annotations

import os

from shardserve.distributed import env
from shardserve.executor.launch import Launch
from shardserve.executor.local_workers import exit_if_reimporting_main
from shardserve.executor.multiproc import MultiprocExecutor
from shardserve.executor.ray_placement import RayPlacement


class RayExecutor(MultiprocExecutor):
    def __init__(self, config):
        exit_if_reimporting_main()          # before Ray is joined: a worker re-running an unguarded script
        self.placement = RayPlacement(config)
        try:
            super().__init__(config, launch=lambda: ray_launch(config, self.placement))
        except BaseException:
            self.placement.release()
            raise

    @property
    def started_ray(self) -> bool:
        return self.placement.started_ray

    def _stop_workers(self, graceful: bool) -> None:
        super()._stop_workers(graceful)
        self.placement.release()


def ray_launch(config, placement: RayPlacement) -> Launch:
    """This node's ranks spawned here; every other placed node's by its agent process (started by its first actor)."""
    par = config.parallel
    timeout = par.distributed_timeout_seconds
    launch = Launch(placement.driver_ip, env.base_port() or 0, os.urandom(32), "SHARDSERVE_HOST_IP/SHARDSERVE_PORT")
    try:
        inits = placement.dist_inits(launch.port, launch.secret, launch.launch_id, timeout)
        base_env = launch.base_env(par.world_size)
        nodes = placement.nodes

        def plan(index: int, _host: str):
            node = nodes[index]
            return [inits[r] for r in node.ranks], {**base_env, **placement.node_env(node)}

        launch.start_local(config, *plan(0, nodes[0].ip), multinode=len(nodes) > 1)
        if len(nodes) > 1:
            # the secret reaches the agents through Ray's own (token-authenticated) channel
            starts = [placement.actors[node.ranks[0]].start_agent.remote(launch.host, launch.port, launch.secret,
                                                                         index, node.ip, timeout)
                      for index, node in enumerate(nodes) if index]
            # the agents give up connecting after `timeout` and say why: wait a little longer for their answer
            placement.get(starts, "joining the driver", timeout + 5,
                          labels=[f"node {node.ip}" for node in nodes[1:]])
            launch.join_nodes(config, set(range(1, len(nodes))), plan, env.heartbeat_timeout(), timeout,
                              par.output_rank)
    except BaseException:
        launch.stop(graceful=False)
        raise
    return launch
