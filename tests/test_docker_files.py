"""The Dockerfile and the compose files must agree with the service: real settings, their defaults, the
GPU reservation and its CPU override, the health check on /readyz. Read as files; no Docker needed."""

from __future__ import annotations

import fnmatch
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from app.config import Settings

ROOT = Path(__file__).resolve().parents[1]
# Variables the compose file reads that are not settings of the service.
COMPOSE_ONLY = {"UNETSEG_IMAGE"}


class Reset:
    """A value tagged ``!reset``: an override removes the key."""


class ComposeLoader(yaml.SafeLoader):
    pass


ComposeLoader.add_constructor("!reset", lambda loader, node: Reset())


def load(name: str) -> dict[str, Any]:
    doc = yaml.load((ROOT / name).read_text(), ComposeLoader)
    assert isinstance(doc, dict), name
    return doc


def merge(base: Any, override: Any) -> Any:
    """Compose's merge for what the override uses: mappings merge, ``!reset`` removes, values replace."""
    if not (isinstance(base, dict) and isinstance(override, dict)):
        return override
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, Reset):
            out.pop(key, None)
        else:
            out[key] = merge(base[key], value) if key in base else value
    return out


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction, args in dockerfile_instructions():
        if instruction == "ENV":
            env.update(re.findall(r"(\w+)=(\S+)", args))
    return env


def dockerfile_healthcheck() -> list[str]:
    [args] = [args for instruction, args in dockerfile_instructions() if instruction == "HEALTHCHECK"]
    command = json.loads(args.split(" CMD ", 1)[1])
    assert isinstance(command, list)
    return command


def service(doc: dict[str, Any]) -> dict[str, Any]:
    svc = doc["services"]["unetseg"]
    assert isinstance(svc, dict)
    return svc


def parsed_default(field: str, text: str) -> object:
    """What the service makes of ``text`` for ``field``, as it would from the environment."""
    return getattr(Settings(_env_file=None, **{field: text}), field)


def test_compose_sets_only_settings_of_the_service() -> None:
    for name in ("compose.yaml", "compose.cpu.yaml"):
        env = service(load(name))["environment"]
        assert isinstance(env, dict), f"{name}: environment as a mapping, so that the override merges"
        for var in env:
            assert var.startswith("UNETSEG_"), f"{name}: {var}"
            assert var.removeprefix("UNETSEG_").lower() in Settings.model_fields, f"{name}: {var} is no setting"


def test_compose_defaults_are_the_service_defaults() -> None:
    text = (ROOT / "compose.yaml").read_text()
    found = re.findall(r"\$\{(UNETSEG_\w+)(:?-)?([^}]*)\}", text)
    assert len(found) > 10
    for var, sep, default in found:
        if var in COMPOSE_ONLY:
            continue
        field = var.removeprefix("UNETSEG_").lower()
        assert field in Settings.model_fields, f"compose.yaml reads {var}, which is no setting"
        assert sep == ":-", f"{var} needs a default (${{{var}:-...}})"
        expected = Settings.model_fields[field].get_default(call_default_factory=True)
        assert parsed_default(field, default) == expected, f"{var}: compose default {default!r}, service {expected!r}"


def test_every_setting_reaches_the_container() -> None:
    image_env = {k for k in dockerfile_env() if k.startswith("UNETSEG_")}
    compose_env = set(service(load("compose.yaml"))["environment"])
    for var in image_env:
        assert var.removeprefix("UNETSEG_").lower() in Settings.model_fields, f"Dockerfile sets {var}, no setting"
    missing = {f"UNETSEG_{f.upper()}" for f in Settings.model_fields} - image_env - compose_env
    assert not missing, f"settings neither fixed by the Dockerfile nor passed by compose.yaml: {sorted(missing)}"


def test_the_image_listens_on_all_interfaces_and_keeps_uploads_in_the_volume() -> None:
    env = dockerfile_env()
    assert env["UNETSEG_HOST"] == "0.0.0.0"
    instructions = dockerfile_instructions()
    volumes = [json.loads(args) for instruction, args in instructions if instruction == "VOLUME"]
    assert [env["UNETSEG_DATA_DIR"]] in volumes
    assert any(instruction == "USER" and args not in ("root", "0") for instruction, args in instructions)
    doc = load("compose.yaml")
    svc = service(doc)
    mounts = [v.split(":") for v in svc["volumes"]]
    assert [m for m in mounts if m[1] == env["UNETSEG_DATA_DIR"] and m[0] in doc["volumes"]], svc["volumes"]
    assert any(str(p).endswith(":" + env["UNETSEG_PORT"]) for p in svc["ports"]), svc["ports"]
    assert svc["restart"] == "unless-stopped"


def test_dependencies_are_installed_before_the_code_is_copied() -> None:
    steps = [f"{instruction} {args}" for instruction, args in dockerfile_instructions()]

    def first(pattern: str) -> int:
        return next(i for i, step in enumerate(steps) if re.search(pattern, step))

    install = first(r"^RUN .*pip install .*requirements")
    assert first(r"^COPY pyproject\.toml") < install < first(r"^COPY app/")
    assert not any(re.match(r"COPY (\.|app|model)\b", step) for step in steps[:install]), steps[:install]
    assert not any(re.search(r"pip install[^&]*\btorch\b", s) and "import torch" not in s for s in steps), steps


def test_the_gpu_is_reserved_and_the_cpu_override_drops_it() -> None:
    base = load("compose.yaml")
    devices = service(base)["deploy"]["resources"]["reservations"]["devices"]
    assert {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]} in devices
    cpu = service(merge(base, load("compose.cpu.yaml")))
    assert "deploy" not in cpu
    assert cpu["environment"]["UNETSEG_DEVICE"] == "cpu"
    # Everything else is kept.
    assert {k: v for k, v in cpu["environment"].items() if k != "UNETSEG_DEVICE"} == {
        k: v for k, v in service(base)["environment"].items() if k != "UNETSEG_DEVICE"
    }
    assert cpu["healthcheck"] == service(base)["healthcheck"]


def test_the_health_checks_ask_readyz() -> None:
    image = dockerfile_healthcheck()
    assert image[0] == "python" and "/readyz" in image[-1]
    compose = service(load("compose.yaml"))["healthcheck"]["test"]
    assert compose == ["CMD", *image], "compose.yaml and the Dockerfile should run the same health check"


@pytest.mark.parametrize("path", [".git", ".venv", "tests", "runs", "data", ".pytest_cache", ".env"])
def test_dockerignore_keeps_out(path: str) -> None:
    patterns = [p for p in (ROOT / ".dockerignore").read_text().splitlines() if p and not p.startswith("#")]
    assert any(fnmatch.fnmatch(path, p) for p in patterns), path


def test_dockerignore_keeps_what_the_image_copies() -> None:
    patterns = [p for p in (ROOT / ".dockerignore").read_text().splitlines() if p and not p.startswith("#")]
    copies = [args.split() for instruction, args in dockerfile_instructions() if instruction == "COPY"]
    sources = [words[0].rstrip("/") for words in copies if not words[0].startswith("--from=")]
    assert "app" in sources and "weights" in sources
    for source in sources:
        assert not any(fnmatch.fnmatch(source, p) for p in patterns), source
