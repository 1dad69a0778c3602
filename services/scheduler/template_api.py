"""TemplateService: the built-in task templates and the ones users save (validated like a task's plan)."""

from __future__ import annotations

import uuid
from typing import Any

import grpc
from google.protobuf import field_mask_pb2
from maw.scheduler.v1 import resources_pb2 as spb
from maw.scheduler.v1 import template_service_pb2 as tmpb
from maw.scheduler.v1 import template_service_pb2_grpc as tmpb_grpc
from sqlalchemy.ext.asyncio import AsyncEngine

from services.runtime import already_exists, failed_precondition, invalid_argument, not_found, replay
from services.runtime.principal import current_principal

from . import _convert as conv
from . import dag, store
from .api import MAX_DESCRIPTION
from .names import ID_PATTERN
from .templates import BUILTIN
from .wire import now_utc

Ctx = grpc.aio.ServicerContext[Any, Any]


class TemplateService(tmpb_grpc.TemplateServiceServicer):
    """Built-in (read-only) and saved workflow templates."""

    def __init__(self, db: AsyncEngine) -> None:
        self.db = db

    @staticmethod
    def _validate(template: spb.Template, prefix: str = "template") -> None:
        problems = []
        if not template.display_name.strip():
            problems.append((f"{prefix}.display_name", "must not be empty"))
        if len(template.display_name) > dag.MAX_DISPLAY_NAME:
            problems.append((f"{prefix}.display_name", f"at most {dag.MAX_DISPLAY_NAME} characters"))
        if len(template.description.encode()) > MAX_DESCRIPTION:
            problems.append((f"{prefix}.description", f"at most {MAX_DESCRIPTION} bytes"))
        problems += dag.validate([conv.step_from_spec(s) for s in template.steps], f"{prefix}.steps")
        if problems:
            raise invalid_argument(problems)

    @staticmethod
    def _id(name: str, field: str = "name") -> str:
        template_id = name.removeprefix("templates/")
        if not name.startswith("templates/") or not ID_PATTERN.match(template_id):
            raise invalid_argument([(field, "must be templates/{template}")])
        return template_id

    async def ListTemplates(self, request: tmpb.ListTemplatesRequest, context: Ctx) -> tmpb.ListTemplatesResponse:
        size = conv.page_size(request.page_size)
        offset = 0
        if request.page_token:
            token = conv.decode_token(request.page_token)
            if not isinstance(token.get("n"), int):
                raise invalid_argument([("page_token", "not a page token for this listing")])
            offset = token["n"]
        if request.filter and request.filter.strip() not in ("built_in = true", "built_in = false"):
            raise invalid_argument([("filter", "supported: built_in = true | built_in = false")])
        async with self.db.connect() as conn:
            saved = [spb.Template.FromString(b) for b in await store.list_templates(conn)]
        everything = [conv.builtin_template(t) for t in BUILTIN.values()] + saved
        if request.filter:
            want = request.filter.strip().endswith("true")
            everything = [t for t in everything if t.built_in == want]
        page = everything[offset : offset + size]
        next_token = conv.encode_token({"n": offset + size}) if offset + size < len(everything) else ""
        return tmpb.ListTemplatesResponse(templates=page, next_page_token=next_token)

    async def GetTemplate(self, request: tmpb.GetTemplateRequest, context: Ctx) -> tmpb.GetTemplateResponse:
        if request.name in BUILTIN:
            return tmpb.GetTemplateResponse(template=conv.builtin_template(BUILTIN[request.name]))
        template_id = self._id(request.name)
        async with self.db.connect() as conn:
            saved = await store.get_template(conn, template_id)
        if saved is None:
            raise not_found("maw.scheduler.v1.Template", request.name)
        return tmpb.GetTemplateResponse(template=spb.Template.FromString(saved[0]))

    async def CreateTemplate(self, request: tmpb.CreateTemplateRequest, context: Ctx) -> tmpb.CreateTemplateResponse:
        template_id = request.template_id or uuid.uuid4().hex[:12]
        if not ID_PATTERN.match(template_id):
            raise invalid_argument([("template_id", "must match [a-z0-9][a-z0-9-]{0,62}")])
        self._validate(request.template)
        name = f"templates/{template_id}"
        if name in BUILTIN:
            raise already_exists("maw.scheduler.v1.Template", name)
        creator = current_principal().name
        template = spb.Template()
        template.CopyFrom(request.template)
        template.name, template.built_in, template.creator = name, False, creator
        template.etag = uuid.uuid4().hex[:12]
        stamp = conv.ts(now_utc())
        assert stamp is not None
        template.create_time.CopyFrom(stamp)
        template.update_time.CopyFrom(stamp)
        if request.validate_only:
            return tmpb.CreateTemplateResponse(template=template)
        async with self.db.begin() as conn:
            if earlier := await replay.recall(
                conn, "CreateTemplate", creator, request.request_id, tmpb.CreateTemplateResponse
            ):
                return earlier
            if not await store.insert_template(conn, template_id, template.SerializeToString(), creator, template.etag):
                raise already_exists("maw.scheduler.v1.Template", name)
            response = tmpb.CreateTemplateResponse(template=template)
            await replay.keep(conn, "CreateTemplate", creator, request.request_id, response)
        return response

    async def UpdateTemplate(self, request: tmpb.UpdateTemplateRequest, context: Ctx) -> tmpb.UpdateTemplateResponse:
        if request.template.name in BUILTIN:
            raise failed_precondition("BUILT_IN", request.template.name, "built-in templates are read-only")
        template_id = self._id(request.template.name, "template.name")
        allowed = {"display_name", "description", "steps", "labels", "default_priority",
                   "default_privacy_level", "default_checkpoint_frequency"}  # fmt: skip
        paths = list(request.update_mask.paths) or sorted(allowed)
        bad = [p for p in paths if p not in allowed]
        if bad:
            raise invalid_argument([("update_mask", f"cannot update {', '.join(bad)}")])
        async with self.db.begin() as conn:
            saved = await store.get_template(conn, template_id)
            if saved is None:
                raise not_found("maw.scheduler.v1.Template", request.template.name)
            if request.template.etag and request.template.etag != saved[1]:
                raise failed_precondition(
                    "ETAG_MISMATCH", request.template.name, "the template changed since it was read"
                )
            template = spb.Template.FromString(saved[0])
            field_mask_pb2.FieldMask(paths=paths).MergeMessage(request.template, template, replace_repeated_field=True)
            self._validate(template)
            template.etag = uuid.uuid4().hex[:12]
            stamp = conv.ts(now_utc())
            assert stamp is not None
            template.update_time.CopyFrom(stamp)
            await store.update_template(conn, template_id, template.SerializeToString(), template.etag)
        return tmpb.UpdateTemplateResponse(template=template)

    async def DeleteTemplate(self, request: tmpb.DeleteTemplateRequest, context: Ctx) -> tmpb.DeleteTemplateResponse:
        if request.name in BUILTIN:
            raise failed_precondition("BUILT_IN", request.name, "built-in templates cannot be deleted")
        template_id = self._id(request.name)
        async with self.db.begin() as conn:
            saved = await store.get_template(conn, template_id)
            if saved is None:
                raise not_found("maw.scheduler.v1.Template", request.name)
            if request.etag and request.etag != saved[1]:
                raise failed_precondition("ETAG_MISMATCH", request.name, "the template changed since it was read")
            await store.delete_template(conn, template_id)
        return tmpb.DeleteTemplateResponse()
