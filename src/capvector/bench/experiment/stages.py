"""A small engine for cached, resumable stages, each a folder of the run with a record (stage.json).

A stage names the stages whose outputs it reads, a plan (everything it will do, as data) and an action that
carries the plan out and returns a summary of its outputs. The stage's key hashes its plan (with the run folder
written as $RUN, so that a moved run folder keeps its keys), the capvector version and the ids of the stages it
reads. A finished stage is skipped while its key holds, and redone, with the reason printed, when its plan, the
code version or an input changed; every finish gives the stage a new id, so the stages after it follow. An
interrupted stage is resumed: its action runs again on the folder as it was left and skips what is done.
"""

from __future__ import annotations

import json
import shutil
import time
import uuid
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from capvector import __version__
from capvector.bench.experiment.layout import RunLayout
from capvector.errors import CapvectorError
from capvector.files import content_hash, read_json, write_json

Context = TypeVar("Context")
Plan = dict[str, Any]


@dataclass(frozen=True)
class Stage(Generic[Context]):
    name: str
    inputs: tuple[str, ...]  # the stages whose outputs it reads
    plan: Callable[[Context], Plan]
    act: Callable[[Context, Plan], dict[str, Any]]


def stale_reason(record: Mapping[str, Any], key: str) -> str | None:
    """Why a stage's folder cannot be reused as it is, or None when it can (finished or resumable)."""
    if not record:
        return None
    if record.get("version") != __version__:
        return f"made by capvector {record.get('version')}, this is {__version__}"
    if record.get("key") != key:
        return "its config or an input stage changed"
    return None


class Pipeline(Generic[Context]):
    """Stages run in order in one run folder. `describe` turns a plan's values into what its key hashes."""

    def __init__(
        self, stages: Mapping[str, Stage[Context]], layout: RunLayout, describe: Callable[[Any], Any] = lambda v: v
    ):
        self.stages, self.layout, self.describe = stages, layout, describe

    def record(self, name: str) -> dict[str, Any]:
        record = read_json(self.layout.stage_record(name))
        return record if isinstance(record, dict) else {}

    def seconds(self) -> dict[str, float | None]:
        return {name: self.record(name).get("seconds") for name in self.stages}

    def check(self, names: Collection[str]) -> None:
        unknown = [name for name in names if name not in self.stages]
        if unknown:
            raise CapvectorError(f"unknown stage {unknown[0]!r}; valid stages: {', '.join(self.stages)}")

    def key(self, stage: Stage[Context], context: Context) -> tuple[str, Plan]:
        plan = stage.plan(context)
        described = {name: self.describe(value) for name, value in plan.items()}
        relative = json.loads(json.dumps(described, default=str).replace(str(self.layout.root), "$RUN"))
        ids = {name: self.record(name).get("id") for name in stage.inputs}
        return content_hash({"stage": stage.name, "version": __version__, "plan": relative, "inputs": ids}), plan

    def listing(self) -> str:
        lines = []
        for number, name in enumerate(self.stages, 1):
            record = self.record(name)
            state = "done" if record.get("done") else "interrupted" if record else "to do"
            lines.append(f"  [{number}/{len(self.stages)}] {name:<11} {state}")
        return "\n".join(lines)

    def run(self, context: Context, force: Collection[str] = ()) -> None:
        """Every stage in order; those in `force` are redone (the stages after them follow, as their inputs do)."""
        self.check(force)
        for number, stage in enumerate(self.stages.values(), 1):
            self.run_stage(stage, f"[{number}/{len(self.stages)}] {stage.name}", context, stage.name in force)

    def run_stage(self, stage: Stage[Context], title: str, context: Context, force: bool) -> None:
        key, plan = self.key(stage, context)
        folder, record = self.layout.stage(stage.name), self.record(stage.name)
        reason = "forced" if force and record else stale_reason(record, key)
        if not reason and record.get("done"):
            print(f"{title}: cached")
            return
        if reason:
            print(f"{title}: redoing ({reason})")
            shutil.rmtree(folder, ignore_errors=True)
        else:
            print(f"{title}: {'resuming' if record else 'running'}")
        folder.mkdir(parents=True, exist_ok=True)
        entry = {"key": key, "version": __version__, "done": False}
        write_json(self.layout.stage_record(stage.name), entry)
        started = time.perf_counter()
        outputs = stage.act(context, plan)
        seconds = time.perf_counter() - started
        entry |= {"done": True, "id": uuid.uuid4().hex, "seconds": seconds, "outputs": outputs}
        write_json(self.layout.stage_record(stage.name), entry)
        print(f"{title}: done in {seconds:.0f} s")
