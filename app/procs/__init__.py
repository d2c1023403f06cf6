"""Several HTTP front-end processes per host sharing one engine process (``unetseg serve --workers N``).

One process is one interpreter lock: a single service process tops out at what one core can parse, decode
and encode, however many cores and however fast a GPU the host has. So the work is split by what it needs:

- ``server``: the engine process: every model loaded once onto the device (one CUDA context, one copy of
  the weights), the batching engine and the memory budget, for all front ends: their requests meet in the
  same batches, which grow as the load grows;
- ``client``: what a front end uses instead of an in-process engine (``RemoteEngine``): the same steps
  (``app.inference.Inference``), the pixels in shared memory (``protocol``), no torch loaded;
- ``frontend``: one front end: the whole HTTP service of ``create_app`` (routes, uploads, the page, docs)
  on a listening socket it shares with the others;
- ``supervisor``: binds the port, starts the engine process and the front ends, restarts a front end that
  dies, and on SIGTERM lets the front ends finish their requests before the engine drains and stops.

``docs/scaling.md`` says why this design rather than N whole services sharing the GPU.
"""
