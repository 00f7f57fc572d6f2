"""`GET /v1/models`: the models this deployment serves, each with its live workers and its
queue; shaped as OpenAI's model list, so its clients list them too. `GET /v1/loras`: the LoRAs
their workers take. `GET /v1/controlnets`: the ControlNets a request may name."""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel, Field

from app.auth import Caller
from app.routes.context import UNAUTHORIZED, Context


class Model(BaseModel):
    id: str = Field(description="The name a request gives as `model`.")
    object: str = "model"
    owned_by: str = "sdserve"
    default: bool = Field(description="Whether a request without `model` goes to it.")
    workers: list[str] = Field(description="Live workers that hold it (their names).")
    queued: int = Field(description="Its jobs waiting for a worker.")


class ModelList(BaseModel):
    object: str = "list"
    data: list[Model]


class LoraEntry(BaseModel):
    name: str = Field(description="What a request's `loras[].name` (or `<lora:name:w>`) gives.")
    models: list[str] = Field(description="The models whose workers take it (their family).")


class LoraList(BaseModel):
    object: str = "list"
    data: list[LoraEntry]


class ControlNetEntry(BaseModel):
    name: str = Field(description="What a request's `controlnets[].model` gives.")


class ControlNetList(BaseModel):
    object: str = "list"
    data: list[ControlNetEntry]


def router(ctx: Context) -> APIRouter:
    routes = APIRouter()
    store = ctx.store

    @routes.get("/v1/models", response_model=ModelList, responses=UNAUTHORIZED,
                summary="The models served, their workers and queues")  # fmt: skip
    def models(_caller: Caller = ctx.authenticated) -> ModelList:
        holders = store.holders()
        queued = store.queue_state().queued
        return ModelList(data=[
            Model(id=name, default=k == 0, workers=holders.get(name, []),
                  queued=queued.get(name, 0))
            for k, name in enumerate(store.models)
        ])  # fmt: skip

    @routes.get("/v1/loras", response_model=LoraList, responses=UNAUTHORIZED,
                summary="The LoRAs served, and the models that take each")  # fmt: skip
    def loras(_caller: Caller = ctx.authenticated) -> LoraList:
        return LoraList(data=[LoraEntry(name=name, models=models)
                              for name, models in store.lora_models().items()])  # fmt: skip

    @routes.get("/v1/controlnets", response_model=ControlNetList, responses=UNAUTHORIZED,
                summary="The ControlNets a request may name (SDSERVE_CONTROLNETS)")  # fmt: skip
    def controlnets(_caller: Caller = ctx.authenticated) -> ControlNetList:
        names = ctx.settings.controlnets
        return ControlNetList(data=[ControlNetEntry(name=name) for name in names])

    return routes
