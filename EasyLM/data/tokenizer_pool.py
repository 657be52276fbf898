"""Records -> documents, in the main process or in a pool of tokenizer processes, in input
order."""
import collections
import itertools
import multiprocessing
import multiprocessing.util
import os
import time

from EasyLM.data.text import process_record

_worker_processor = None
WORKER_START_SECONDS = 120
STOP_SECONDS = 60  # for the batches in flight to finish when the stream is closed


def _start_worker(processor):
    global _worker_processor
    _worker_processor = processor


def _process_in_worker(payload):
    return process_record(_worker_processor, payload)


def tokenized(records, processor, processes, batch_size, chunk_size):
    """``(position, where, outcome)`` for each ``(position, where, payload)``, in input order.

    With several processes, batches of ``batch_size`` records are mapped in a pool while
    the previous batch is consumed; 'spawn' keeps the workers clear of JAX's threads."""
    if processes <= 1:
        for position, where, payload in records:
            yield position, where, process_record(processor, payload)
        return
    pool = multiprocessing.get_context("spawn").Pool(
        processes, initializer=_start_worker, initargs=(processor,))
    try:
        # A worker that cannot start is replaced by the pool forever; fail instead.
        pool.apply_async(os.getpid).get(timeout=WORKER_START_SECONDS)
    except multiprocessing.TimeoutError:
        pool.terminate()
        raise RuntimeError(
            f"tokenizer processes did not start within {WORKER_START_SECONDS} s; a script that "
            "sets tokenizer_processes > 1 must run its code under "
            "'if __name__ == \"__main__\":' (workers are spawned)") from None
    in_flight = collections.deque()

    def submit():
        batch = list(itertools.islice(records, batch_size))
        if batch:
            payloads = [payload for _, _, payload in batch]
            in_flight.append((batch, pool.map_async(_process_in_worker, payloads, chunk_size)))
    try:
        submit()
        while in_flight:
            batch, outcomes = in_flight.popleft()
            submit()
            for (position, where, _), outcome in zip(batch, outcomes.get()):
                yield position, where, outcome
    finally:
        stop(pool, [outcomes for _, outcomes in in_flight])


def stop(pool, pending):
    """Ends ``pool`` once the ``pending`` results have arrived (at most ``STOP_SECONDS``).

    Killing the workers at once (``Pool.terminate``) can hang: a worker killed while it writes
    a result leaves half a message in the result pipe, and the pool's result thread, draining
    the pipe as it stops, waits for the rest forever (a runner closing its evaluation stream
    under load did).  Idle workers leave cleanly; a pool that does not finish in time is
    terminated as before.  At interpreter exit (a stream left open is finalized after
    multiprocessing has stopped every pool) there is nothing left to wait for."""
    if multiprocessing.util.is_exiting():
        pool.terminate()
        return
    deadline = time.monotonic() + STOP_SECONDS
    for outcomes in pending:
        outcomes.wait(max(0.0, deadline - time.monotonic()))
    if all(outcomes.ready() for outcomes in pending):
        pool.close()
        pool.join()
    else:
        pool.terminate()
