"""deploy/serve.yaml is a valid Serve config whose import path builds the service's application."""

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
from app.ray.deployment import DEPLOYMENT_NAME, build

pytestmark = pytest.mark.ray

CONFIG = Path(__file__).resolve().parents[2] / "deploy" / "serve.yaml"


def config() -> dict[str, Any]:
    data = yaml.safe_load(CONFIG.read_text())
    assert isinstance(data, dict)
    return data


def test_the_config_validates_and_sets_replicas_gpus_and_autoscaling() -> None:
    schema = ServeDeploySchema.model_validate(config())
    (application,) = schema.applications
    (deployment,) = application.deployments
    assert deployment.name == DEPLOYMENT_NAME
    auto = deployment.autoscaling_config
    assert isinstance(auto, dict)
    assert {"min_replicas", "max_replicas", "target_ongoing_requests"} <= set(auto)
    assert deployment.ray_actor_options.num_gpus == 0  # type: ignore[union-attr]
    # What one replica reserves: a 2-core machine must fit more than one (it asked 2 cores, so fitted one).
    assert deployment.ray_actor_options.num_cpus <= 1  # type: ignore[union-attr]
    assert deployment.backpressure_config.retry_after_s is not None  # type: ignore[union-attr]


def test_the_import_path_builds_the_application_with_the_settings_given() -> None:
    (application,) = config()["applications"]
    builder = import_attr(application["import_path"])
    assert builder is build
    app = builder(application["args"])
    bound = app._bound_deployment
    assert bound.name == DEPLOYMENT_NAME
    given = application["args"]["settings"]
    settings = Settings(**bound.init_args[0])
    assert settings.model_dump(include=set(given)) == given


def test_the_config_as_shipped_serves_the_shipped_bundles_from_any_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`serve run deploy/serve.yaml` as the README gives it: each replica builds its Settings from the
    config's in its own working folder, and must find bundles there (it once named /srv/unetseg/weights,
    which did not exist)."""
    (application,) = config()["applications"]
    monkeypatch.chdir(tmp_path)
    settings = Settings(**build(application["args"])._bound_deployment.init_args[0])
    assert sorted(p.name for p in settings.weights_dir.glob("*/card.json")) != []
    for value in application["args"]["settings"].values():  # no path that only exists on some machine
        assert not str(value).startswith("/")


def test_unknown_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="weights_folder"):
        build({"settings": {"weights_folder": "/w"}})
