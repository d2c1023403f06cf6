"""The service on Ray Serve: the same ``create_app`` in every replica (needs the ``ray`` extra).

- ``app.ray.deployment``: the Serve deployment (one whole app per replica, its health check) and
  ``build``, the application builder that ``deploy/serve.yaml`` names for ``serve run`` / ``serve deploy``.
- ``app.ray.launch``: ``unetseg serve --ray``: start or join a Ray cluster, run the application, and on
  SIGTERM shut down what it started.

Nothing here is imported unless Ray is asked for, so the one-process service never needs Ray.
"""
