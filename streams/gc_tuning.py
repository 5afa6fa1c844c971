"""Garbage collector set-up of the worker (streams/app.py) and the ingest (streams/ingest.py).

CPython's full collections traverse every tracked container alive, and in the worker most of them are
start-up's: the imported modules and classes (faust, pydantic and the fhir.resources models,
onnxruntime, numpy), ~115k objects, ~50 ms per full collection. The worker's patient states and
outputs set one off every ~0.5 s of work: collections took 17% of its processor's CPU, 7% with
start-up's objects frozen (gc.freeze: they live as long as the process anyway; what it allocates
afterwards is collected as before).

Young collections: CPython starts one whenever the tracked objects allocated and not yet freed grow
by 700 (the count drops as objects are freed), and a batch holds its objects until it is done: the
ingest's 5,000 consumed records with their parsed events, the worker's decoded canonical events and
outputs. Each batch then set off a hundred young collections that traversed, and promoted towards
the old generation, objects that all die by reference count when the batch ends; those promotions
in turn trigger the full collections. py-spy of a backlog: collections 12% of the ingest's busy
samples and 6-14% of the worker's. With a young threshold above one batch's objects they are
freed before any collection sees them; cyclic garbage (rare here) is still collected, after at
most YOUNG_THRESHOLD more objects.
"""

from __future__ import annotations

import gc

# above the tracked objects one batch holds at once (ingest: ~15 per raw record, 5,000 records)
YOUNG_THRESHOLD = 100_000


def freeze_startup_heap() -> None:
    gc.collect()  # start-up's garbage is freed, not frozen
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, older, oldest)
