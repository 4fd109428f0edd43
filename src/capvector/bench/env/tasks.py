"""The Meta-World v3 tasks of the embedded benchmark, their instructions and the named splits.

A task's `task_index` is its position in `TASKS` (stable across datasets and evaluations, so a policy's
task embedding means the same task everywhere). Every task here has visible objects and goals in the
two cameras and a scripted expert that succeeds on essentially every placement (100% on 12 placements each).

Splits (each disjoint from the others):
- pretrain: broad pretraining of theta_pt (12 tasks).
- extract: D_ext, the capability-extraction set (4 tasks).
- downstream: held-out tasks for finetuning from theta_meta (4 tasks).
"""

from __future__ import annotations

from capvector.errors import CapvectorError

# task name -> natural-language instruction (LeRobot-style task description)
TASKS = {
    "reach-v3": "reach the goal position",
    "push-v3": "push the puck to the goal",
    "pick-place-v3": "pick up the puck and place it at the goal",
    "button-press-v3": "press the button from the front",
    "button-press-topdown-v3": "press the button from the top",
    "drawer-open-v3": "open the drawer",
    "drawer-close-v3": "close the drawer",
    "window-open-v3": "slide the window open",
    "window-close-v3": "slide the window closed",
    "faucet-open-v3": "turn the faucet handle to open it",
    "handle-press-v3": "press the handle down",
    "plate-slide-v3": "slide the plate into the goal",
    "coffee-push-v3": "push the mug under the coffee machine",
    "sweep-into-v3": "sweep the block into the hole",
    "door-close-v3": "close the door",
    "handle-pull-v3": "pull the handle up",
    "button-press-wall-v3": "press the button behind the wall",
    "plate-slide-back-v3": "slide the plate back out of the goal",
    "faucet-close-v3": "turn the faucet handle to close it",
    "door-lock-v3": "lock the door by turning the lock",
}

SPLITS = {
    "pretrain": [
        "reach-v3",
        "push-v3",
        "pick-place-v3",
        "button-press-v3",
        "button-press-topdown-v3",
        "drawer-open-v3",
        "drawer-close-v3",
        "window-open-v3",
        "window-close-v3",
        "faucet-open-v3",
        "handle-press-v3",
        "plate-slide-v3",
    ],
    "extract": ["coffee-push-v3", "sweep-into-v3", "door-close-v3", "handle-pull-v3"],
    "downstream": ["button-press-wall-v3", "plate-slide-back-v3", "faucet-close-v3", "door-lock-v3"],
}


def check_task(name: str) -> str:
    if name not in TASKS:
        raise CapvectorError(
            f"unknown task {name!r}; valid tasks: {', '.join(TASKS)} (or a split: {', '.join(SPLITS)})"
        )
    return name


def task_index(name: str) -> int:
    return list(TASKS).index(check_task(name))


def instruction(name: str) -> str:
    return TASKS[check_task(name)]


def resolve_tasks(names: str | list[str]) -> list[str]:
    """Task names from a list or a comma-separated string of task and split names, in order, without repeats."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    out = []
    for name in names:
        for task in SPLITS.get(name, [name]):
            if check_task(task) not in out:
                out.append(task)
    if not out:
        raise CapvectorError(f"no tasks given; pick tasks from {', '.join(TASKS)} or a split: {', '.join(SPLITS)}")
    return out


def list_tasks() -> list[dict]:
    """One row per task: name, task_index, instruction and the split it belongs to."""
    split_of = {task: split for split, tasks in SPLITS.items() for task in tasks}
    return [
        {"name": name, "task_index": i, "instruction": text, "split": split_of.get(name, "")}
        for i, (name, text) in enumerate(TASKS.items())
    ]
