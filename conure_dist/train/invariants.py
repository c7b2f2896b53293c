"""A run directory's invariants, checked from its files alone: a sanity check after a crash,
a restore, or a hand copy, and the check the fault-injection tests run after every stage.

- **checksums**: every state file the manifest records a digest for exists and matches it;
- **owner map**: each version (``state/owners-v<n>``) keeps every owner of the one before and
  only gives free entries to one new task, numbered above every earlier owner;
- **capacity**: each pruned task owns exactly what its prune ratios give it
  (:mod:`conure_dist.train.capacity`, the plan from an all-free map);
- **frozen entries**: everything that serves a committed task (its head and patches, the
  shared backbone, the backbone entries owned by it or earlier tasks; for per-task methods its
  whole weight set) is bit for bit what it was at the task's commit;
- **stages**: no stage completed twice; the ledger's steps are recorded as done;
- **reports**: ``reports/STATUS.txt``, where written, says ``complete`` only when every task of
  the manifest is committed (it may lag one commit behind after a crash: the manifest is
  saved first, and the next run rewrites the reports).

Methods that protect nothing (``sinmoall`` fine-tunes the one backbone task after task) have
no frozen entries to check. Usage::

    problems = check_run_invariants("runs/demo")     # [] when every invariant holds
    python -m conure_dist.train.invariants runs/demo
"""

from __future__ import annotations

import sys
from typing import Any

import torch

from conure_dist.model import OwnerMap
from conure_dist.train.rundir import MANIFEST, RunDir, RunDirError, digest


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal shape, dtype and bytes (unlike ``torch.equal``: -0.0 differs from 0.0, NaN equals itself)."""
    from conure_dist.model.freeze import _bits  # the raw bits the frozen-weight guard compares

    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(_bits(a), _bits(b))


def _protects(method) -> bool:
    """Whether a method keeps what serves a committed task unchanged afterwards."""
    return method.masking or method.backbones == "per_task" or method.later in ("head", "patches")


def check_run_invariants(run_dir: str) -> list[str]:
    """Every broken invariant of the run in ``run_dir``, one line each; [] when all hold."""
    from conure_dist.config import ExperimentConfig
    from conure_dist.train.plan import get_method

    rundir = RunDir(run_dir)
    try:
        manifest: dict[str, Any] = rundir.read_json(MANIFEST)
    except (RunDirError, OSError) as e:
        return [f"{rundir.path(MANIFEST)}: cannot be read ({e})"]
    problems: list[str] = []
    problems += _checksums(rundir, manifest)
    owners, versions = _owner_versions(rundir, manifest, problems)
    exp = ExperimentConfig.from_dict(manifest["config"])
    method = get_method(manifest.get("method", exp.method))
    if owners is not None and method.masking:
        problems += _capacity(exp, owners)
    if owners is not None and _protects(method):
        problems += _frozen(rundir, manifest, owners if method.masking else None)
    problems += _stages(manifest)
    problems += _status(rundir, manifest)
    return problems


def _status(rundir: RunDir, manifest: dict) -> list[str]:
    from conure_dist.train.coordinator import STATUS_REPORT

    if not rundir.exists(STATUS_REPORT):
        return []  # no task committed yet (reports are written at each commit)
    said = rundir.read_bytes(STATUS_REPORT).decode().split(":", 1)[0]
    complete = all(manifest["ledger"].get(t) == "commit" for t in manifest["tasks"])
    if said not in ("complete", "incomplete") or (said == "complete" and not complete):
        return [f"{STATUS_REPORT} says {said!r}, but the run is not complete (ledger {manifest['ledger']})"]
    return []


def _checksums(rundir: RunDir, manifest: dict) -> list[str]:
    sums = manifest.get("state_checksums")
    if sums is None:
        return []  # a run written before the checksums
    out = []
    state = manifest["state"]
    for rel in [state["weights"], state["owners"], *state.get("sets", {}).values()]:
        if rel not in sums:
            out.append(f"{rel}: the manifest points at it but records no checksum for it")
    for rel, expected in sorted(sums.items()):
        if not rundir.exists(rel):
            out.append(f"{rel}: recorded in the manifest, missing from the run directory")
        elif digest(rundir.read_bytes(rel)) != expected:
            out.append(f"{rel}: its content does not match the manifest's checksum")
    return out


def _read_owners(rundir: RunDir, rel: str, problems: list[str]) -> OwnerMap | None:
    try:
        return OwnerMap.from_state_dict(rundir.read_tensors(rel))
    except Exception as e:  # a missing or unreadable file is reported, not raised
        problems.append(f"{rel}: cannot be read as an owner map ({e})")
        return None


def _owner_versions(rundir: RunDir, manifest: dict, problems: list[str]) -> tuple[OwnerMap | None, int]:
    """The current owner map, after checking that each version only gains owners."""
    version = manifest.get("owner_map_version", 0)
    previous = None
    for v in range(version + 1):
        current = _read_owners(rundir, f"state/owners-v{v}.safetensors", problems)
        if current is None:
            return None, version
        if previous is not None:
            problems += [f"owner map v{v}: {p}" for p in _gains_only(previous, current)]
        previous = current
    if manifest["state"].get("owners") != f"state/owners-v{version}.safetensors":
        problems.append(f"the manifest points at {manifest['state'].get('owners')}, not at owner map version {version}")
    return previous, version


def _gains_only(before: OwnerMap, after: OwnerMap) -> list[str]:
    if set(before.names) != set(after.names):
        return [f"other tensors than the version before ({sorted(set(before.names) ^ set(after.names))})"]
    out = []
    newest = before.max_task
    for name in before.names:
        old, new = before.owner(name), after.owner(name)
        owned = old != 0
        if not torch.equal(old[owned], new[owned]):
            out.append(f"{name}: {int((old[owned] != new[owned]).sum())} owned entries changed owner")
        gained = new[~owned & (new != 0)]
        if gained.numel() and (int(gained.min()) <= newest or int(gained.min()) != int(gained.max())):
            out.append(f"{name}: free entries went to tasks {sorted(set(gained.tolist()))}, not to one new task "
                       f"after task {newest}")
    return out


def _capacity(exp, owners: OwnerMap) -> list[str]:
    from conure_dist.train.capacity import plan_capacity

    owned = owners.capacity().owned
    out = []
    for row in plan_capacity(exp):  # from an all-free map: what the configured ratios give each task
        if row.number in owned and owned[row.number] != row.kept:
            out.append(f"task {row.name} owns {owned[row.number]} entries; its prune ratios give it {row.kept}")
    return out


def _served(name: str, task: str, owners: OwnerMap | None, number: int) -> torch.Tensor | bool:
    """Which entries of parameter ``name`` serve task ``task``: a bool for whole tensors, a mask
    for prunable ones."""
    if name.startswith(("heads.", "patches.")):
        return name.split(".")[1] == task
    if owners is not None and name in owners.names:
        owner = owners.owner(name)
        return (owner >= 1) & (owner <= number)
    return True


def _frozen(rundir: RunDir, manifest: dict, owners: OwnerMap | None) -> list[str]:
    tasks, ledger = manifest["tasks"], manifest["ledger"]
    state = manifest["state"]
    sets = state.get("sets", {})
    out = []
    try:
        shared = rundir.read_tensors(state["weights"])
    except Exception as e:
        return [f"{state['weights']}: cannot be read ({e})"]
    for number, task in enumerate(tasks, start=1):
        if ledger.get(task) != "commit":
            continue
        rel = f"state/weights-{task}-commit.safetensors"
        try:
            at_commit = rundir.read_tensors(rel)
            now = rundir.read_tensors(sets[task]) if task in sets else shared
        except Exception as e:
            out.append(f"task {task}: its commit or serving weights cannot be read ({e})")
            continue
        changed = []
        for name, value in at_commit.items():
            served = _served(name, task, owners, number)
            if served is False:
                continue
            if name not in now:
                changed.append(f"{name} (missing)")
            elif served is True and not same_bits(value, now[name]):
                changed.append(name)
            elif served is not True and not same_bits(value[served], now[name][served]):
                changed.append(f"{name} ({int((value[served] != now[name][served]).sum())} entries)")
        if changed:
            out.append(f"task {task}: what serves it changed since its commit: {', '.join(changed[:5])}"
                       + (f" and {len(changed) - 5} more" if len(changed) > 5 else ""))
    return out


def _stages(manifest: dict) -> list[str]:
    from conure_dist.train.plan import Step

    out = [f"stage {key} completed {s['completions']} times" for key, s in sorted(manifest.get("stages", {}).items())
           if s.get("completions", 0) > 1]
    method_steps = None
    try:
        from conure_dist.train.plan import get_method

        method_steps = [s.value for s in get_method(manifest["method"]).steps]
    except (KeyError, ValueError):
        pass
    for task, last in manifest["ledger"].items():
        if last is None or method_steps is None:
            continue
        for step in method_steps[: method_steps.index(Step(last).value) + 1]:
            s = manifest["stages"].get(f"{task}/{step}", {})
            if s.get("status") != "done":
                out.append(f"the ledger has task {task} past {step}, whose stage is {s.get('status', 'not recorded')}")
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m conure_dist.train.invariants",
                                     description="Check a run directory's invariants (exit 0: all hold, 1: some broken).")
    parser.add_argument("run_dir", metavar="RUN_DIR", help="run directory: local path or URI")
    args = parser.parse_args(argv)
    problems = check_run_invariants(args.run_dir)
    for p in problems:
        print(p)
    print("every invariant holds" if not problems else f"{len(problems)} invariant(s) broken")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
