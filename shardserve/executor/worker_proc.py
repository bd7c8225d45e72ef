"""The main loop of a worker process: take RPCs from the driver, answer, exit with the driver."""
from __future__ import annotations

import ctypes
import os
import pickle
import signal
import threading
import time
import traceback


def die_with_parent() -> None:
    """Never outlive the driver: PR_SET_PDEATHSIG, plus a watchdog for when that is not enough."""
    parent = os.getppid()
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)    # PR_SET_PDEATHSIG
    except OSError:
        pass

    def watch() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, daemon=True, name="parent-watchdog").start()


BEAT_INTERVAL_S = 0.5


def beat(beats, index: int) -> None:
    """Write this process's monotonic clock into beats[index] every BEAT_INTERVAL_S, from a thread: it stops
    only when the whole process does (SIGSTOP, a freeze), which is what the parent watches for."""
    def run() -> None:
        while True:
            beats[index] = time.monotonic()
            time.sleep(BEAT_INTERVAL_S)

    beats[index] = time.monotonic()
    threading.Thread(target=run, daemon=True, name="liveness-beat").start()


def worker_main(config, dist_init, conn, queue_handle: tuple, env: dict[str, str], beats=None,
                index: int = 0) -> None:
    """Runs in the spawned process. Commands arrive on the shared-memory broadcast queue, each
    pickle((method, args)); replies go back on `conn`: ("ok", result) or ("error", traceback text).
    execute_model answers only where it returns something (the output rank). A rank on another node than the
    driver's may instead answer, and take its commands, on its own authenticated connection to the driver."""
    os.environ.update(env)
    die_with_parent()
    if beats is not None:
        beat(beats, index)
    signal.signal(signal.SIGINT, signal.SIG_IGN)        # the driver decides when we stop
    from shardserve.executor.shm_queue import BroadcastReader
    from shardserve.worker.worker import Worker          # after the environment is in place

    if dist_init.reply_to_driver:
        from shardserve.distributed.secure_channel import connect
        conn = connect(dist_init.master_addr, dist_init.master_port, dist_init.secret, dist_init.timeout_s)
        conn.send(("replies", dist_init.rank))
    if dist_init.commands_from_driver:      # verified frames from the driver
        commands, receive = conn, conn.recv_bytes
    else:                                   # the node's ring
        commands = BroadcastReader(queue_handle)
        receive = commands.read
    worker = Worker(config, dist_init)
    while True:
        method, args = pickle.loads(receive())
        try:
            result = getattr(worker, method)(*args)
        except BaseException:
            conn.send_bytes(pickle.dumps(("error", traceback.format_exc())))
            break
        if method != "execute_model" or result is not None:
            conn.send_bytes(pickle.dumps(("ok", result)))
        if method == "shutdown":
            break
    try:
        worker.shutdown()
        commands.close()
    except Exception:
        pass
    os._exit(0)
