"""A Ray node's agent in its own process, started by the node's first RankActor: a headless node that Ray placed.

Run as `python -m shardserve.executor.ray_agent_process`: it reads its orders (one pickled tuple, with the launch
secret) from stdin, joins the driver's control port, prints "joined" (or the error) on stdout, then serves its
node's ranks exactly as `serve --headless` does. It dies with the actor that started it. Ray starts its worker
processes at nice 15; the agent puts itself, and so the ranks it spawns, back at nice 0 (normal_priority).
"""
from __future__ import annotations

import os
import pickle
import sys

from shardserve.executor.node_agent import join, serve
from shardserve.executor.ray_placement import normal_priority
from shardserve.executor.worker_proc import die_with_parent


def main() -> int:
    die_with_parent()
    normal_priority()
    master_addr, master_port, secret, node_rank, host, timeout_s = pickle.load(sys.stdin.buffer)
    try:
        channel, host = join(master_addr, master_port, secret, node_rank, host, timeout_s)
    except Exception as exc:                      # the actor raises this text: the driver names the node
        print(f"error {exc}", flush=True)
        return 1
    print("joined", flush=True)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())    # nobody reads the pipe now: output goes to Ray's log
    return serve(channel, host, master_addr, master_port, timeout_s)


if __name__ == "__main__":
    sys.exit(main())
