"""What spawned test ranks put on their queue, (rank, traceback or None, result), collected; stragglers killed."""
from __future__ import annotations


def collect(procs: list, queue, timeout: float) -> dict[int, object]:
    """{rank: result} once every rank answered; a rank's traceback fails the test. Every process is gone after."""
    results, errors = {}, []
    try:
        for _ in procs:
            rank, err, result = queue.get(timeout=timeout)
            if err:
                errors.append(f"rank {rank}:\n{err}")
            results[rank] = result
        for p in procs:
            p.join(timeout=30)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    assert not errors, "\n".join(errors)
    return results
