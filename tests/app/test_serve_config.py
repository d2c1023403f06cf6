"""deploy/serve.yaml is a valid Serve config whose import paths build the service's two applications: the
engines and the front ends."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml

if os.environ.get("CI") == "true":
    import ray  # noqa: F401  (CI installs the ray extra: without it these tests must fail, not skip)
else:
    pytest.importorskip("ray", reason="needs the ray extra: pip install -e '.[ray]'")

from ray.serve._private.utils import import_attr  # the loader `serve run` and `serve deploy` use
from ray.serve.schema import ServeDeploySchema

from app.config import Settings
from app.ray.deployment import APP_NAME, DEPLOYMENT_NAME, ENGINE_APP, ENGINE_NAME, build, build_engine
from app.ray.launch import engine_plan

pytestmark = pytest.mark.ray

CONFIG = Path(__file__).resolve().parents[2] / "deploy" / "serve.yaml"


def config() -> dict[str, Any]:
    data = yaml.safe_load(CONFIG.read_text())
    assert isinstance(data, dict)
    return data


def test_the_config_validates_and_sets_replicas_gpus_and_autoscaling() -> None:
    schema = ServeDeploySchema.model_validate(config())
    engines, frontends = schema.applications
    assert (engines.name, engines.route_prefix) == (ENGINE_APP, None)  # no HTTP route: front ends call it
    assert (frontends.name, frontends.route_prefix) == (APP_NAME, "/")
    (engine,) = engines.deployments
    assert engine.name == ENGINE_NAME
    assert engine.num_replicas == 1
    (frontend,) = frontends.deployments
    assert frontend.name == DEPLOYMENT_NAME
    auto = frontend.autoscaling_config
    assert isinstance(auto, dict)
    assert {"min_replicas", "max_replicas", "target_ongoing_requests"} <= set(auto)
    assert frontend.backpressure_config.retry_after_s is not None  # type: ignore[union-attr]
    for deployment in (engine, frontend):
        assert deployment.ray_actor_options.num_gpus in (0, None)  # type: ignore[union-attr]
        # What one replica reserves: a 2-core machine must fit an engine and a front end.
        assert deployment.ray_actor_options.num_cpus <= 1  # type: ignore[union-attr]


def test_the_import_paths_build_the_applications_with_the_same_settings() -> None:
    engines, frontends = config()["applications"]
    for application, builder, name in ((engines, build_engine, ENGINE_NAME), (frontends, build, DEPLOYMENT_NAME)):
        assert import_attr(application["import_path"]) is builder
        bound = builder(application["args"])._bound_deployment
        assert bound.name == name
        given = application["args"]["settings"]
        settings = Settings(**bound.init_args[0])
        assert settings.model_dump(include=set(given)) == given
    assert engines["args"] == frontends["args"]


def test_the_config_as_shipped_serves_the_shipped_bundles_from_any_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`serve run deploy/serve.yaml` as the README gives it: each replica builds its Settings from the
    config's in its own working folder, and must find bundles there (it once named /srv/unetseg/weights,
    which did not exist)."""
    application = config()["applications"][0]
    monkeypatch.chdir(tmp_path)
    settings = Settings(**build_engine(application["args"])._bound_deployment.init_args[0])
    assert sorted(p.name for p in settings.weights_dir.glob("*/card.json")) != []
    for value in application["args"]["settings"].values():  # no path that only exists on some machine
        assert not str(value).startswith("/")


def test_unknown_settings_are_refused() -> None:
    for builder in (build, build_engine):
        with pytest.raises(ValueError, match="weights_folder"):
            builder({"settings": {"weights_folder": "/w"}})


def test_engines_default_to_one_per_gpu_of_the_cluster_and_to_the_cpu_without_one() -> None:
    assert engine_plan({"CPU": 2}, 0, None, "auto") == (1, 0.0)
    assert engine_plan({"CPU": 64, "GPU": 4}, 0, None, "auto") == (4, 1.0)
    assert engine_plan({"CPU": 64, "GPU": 4}, 0, 0.5, "auto") == (8, 0.5)
    assert engine_plan({"CPU": 64, "GPU": 4}, 2, None, "cuda") == (2, 1.0)  # a count given is kept
    assert engine_plan({"CPU": 64, "GPU": 4}, 0, None, "cpu") == (1, 0.0)  # the settings ask for the CPU
    assert engine_plan({"CPU": 2}, 0, 1.0, "auto") == (1, 1.0)  # asked for: it waits for a GPU (logged)
