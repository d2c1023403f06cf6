"""The loaded models and their cards."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path

from app.deps import EngineDep, KeyCheckedRoute
from app.inference import ModelInfo
from app.routes.errors import ERRORS
from app.schemas import ClassOut, DatasetOut, InputPolicyOut, InstancesOut, ModelList, ModelOut

router = APIRouter(tags=["models"], route_class=KeyCheckedRoute)


def describe(m: ModelInfo, default: bool) -> ModelOut:
    c = m.card
    return ModelOut(
        name=c.name,
        version=c.version,
        description=c.description,
        default=default,
        device=m.device_name,
        precision=m.precision,
        graph=m.graph,
        max_batch=m.max_batch,
        classes=[ClassOut(id=k.id, name=k.name, color=k.color) for k in c.classes],
        input=InputPolicyOut(
            channels=c.input.channels,
            sizing=c.input.sizing,
            size=c.input.size,
            overlap=c.input.overlap,
            mean=list(c.input.mean),
            std=list(c.input.std),
        ),
        metrics=dict(c.metrics),
        dataset=DatasetOut(
            name=c.dataset.name, url=c.dataset.url, license=c.dataset.license, citation=c.dataset.citation
        ),
        architecture=c.architecture.to_dict(),
        instances=InstancesOut(
            method=c.instances.method,
            interior=c.instances.interior,
            boundary=c.instances.boundary,
            min_area=c.instances.min_area,
        )
        if c.instances is not None
        else None,
    )


@router.get(
    "/models",
    summary="List the models",
    response_model=ModelList,
    description="Every loaded model: version, classes and colors, input policy, validation metrics, "
    "whether it is the default, the device and precision it runs with, and whether (and how) it separates "
    "instances.",
    responses={k: ERRORS[k] for k in (401, 503)},
)
async def list_models(engine: EngineDep) -> ModelList:
    return ModelList(
        default_model=engine.default_model,
        models=[describe(m, name == engine.default_model) for name, m in engine.models.items()],
    )


@router.get(
    "/models/{name}",
    summary="Describe one model",
    description="One model's card, as listed by `GET /v1/models`.",
    response_model=ModelOut,
    responses={k: ERRORS[k] for k in (401, 404, 503)},
)
async def get_model(
    name: Annotated[str, Path(description="The model's name, as listed by `GET /v1/models`.", examples=["polyp"])],
    engine: EngineDep,
) -> ModelOut:
    m = engine.get(name)
    return describe(m, name == engine.default_model)
