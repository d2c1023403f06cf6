"""The service on Ray Serve: front-end replicas (``create_app`` on CPUs) and engine replicas (the models, one
per GPU), scaled apart (needs the ``ray`` extra).

- ``app.ray.deployment``: the two Serve deployments, their health checks, and ``build`` / ``build_engine``,
  the application builders that ``deploy/serve.yaml`` names for ``serve run`` / ``serve deploy``.
- ``app.ray.engine``: an engine replica (the engine process of ``serve --workers`` behind Serve's handles).
- ``app.ray.frontend``: ``RayEngine``, a front end's ``Inference`` over a handle to the engine replicas.
- ``app.ray.launch``: ``unetseg serve --ray``: start or join a Ray cluster, run the applications, and on
  SIGTERM shut down what it started, front ends first.

Nothing here is imported unless Ray is asked for, so the one-process service never needs Ray.
"""
