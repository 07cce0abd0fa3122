"""The whole GPU session in one call: every step of issue 20's part B, each under its own time limit, in order.

    OUT=/tmp/out python -m benchmarks.gpu_session [--steps env,data,...] [--dry]   (or: bash benchmarks/gpu_session.sh)

Each step runs in a child forked from this process (which has imported torch once, and never touches CUDA, so
that forking is safe): a hang or a crash in one step is killed or caught at its limit and the next one starts.
A step writes each of its measurements to a JSON-lines file as soon as it has it, so a step stopped half-way
keeps what it finished. ``$OUT`` receives three files: ``results.json`` (rewritten atomically after every
step), ``session.log`` (this runner's lines and every step's own output) and ``profile.txt`` (the profile step).

The limits are for the GPU run; a whole session must end inside one 10-minute call with the machine's start
(``DEADLINE_S``: a step is given at most what is left of it). ``--dry`` runs the same steps on the CPU at tiny
sizes (``benchmarks/gpu_steps.py``'s ``DRY``), with their own limits. ``GPU_SESSION_LIMITS=step=seconds,...``
overrides limits (the test forces a step to time out with it).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

from common.checkpoint import atomic_write_text


@dataclasses.dataclass(frozen=True)
class Step:
    name: str
    limit_s: float  # on the GPU
    dry_limit_s: float  # --dry: caps for a loaded 2-core machine, far above what an idle one takes
    what: str


# One table of every step and its limit. The GPU limits sum to 585 s against a 540 s deadline: they are caps,
# not estimates (about 380 s is our guess until a first run), and a step that runs late only shortens the last.
STEPS = (
    Step("env", 15, 60, "NVML name, driver, CUDA, torch, torchvision, DALI, timm, ONNX Runtime; the arguments"),
    Step("data", 60, 60, "ImageNet-sized JPEGs from scikit-image's photos (20,000 with 16 processes on the GPU)"),
    Step("gpu_tests", 120, 90, "pytest tests/test_gpu.py (AMP + GradScaler checkpoint, evaluate, predict, NVML, "
                               "--gpu-affinity, sync-free steady-state steps, CUDA graphs; DALI where present)"),
    Step("ddp_world_one", 25, 60, "NCCL process group of one: DDP gradients equal the plain model's"),
    Step("train_resnet50", 120, 180, "ResNet-50 AMP fp16 channels_last: synthetic, pytorch (JPEGs), DALI; "
                                    "plain loop and timm's resnet50 beside the engine"),
    Step("train_compile", 90, 120, "--compile on the fastest backend of train_resnet50"),
    Step("profile", 20, 60, "torch.profiler's top ops of the engine's training step"),
    Step("inference", 75, 180, "ResNet-50 at batch 1, 64, 256: eager, channels_last, compiled with CUDA graphs, "
                              "ONNX Runtime with the CUDA provider"),
    Step("other_models", 60, 180, "MobileNet v1 1.0 and 0.5, MobileNet v2, VGG-16-BN: training and inference"),
    # --steps dali: what DALI adds, for a session whose other figures are already measured (GPU_SESSION.md).
    Step("dali_tests", 60, 60, "pytest -k dali tests/test_gpu.py (dali-gpu against dali-cpu)"),
    Step("train_dali", 60, 120, "ResNet-50 training on dali-gpu and dali-cpu"),
)  # fmt: skip
BY_NAME = {s.name: s for s in STEPS}
DEFAULT_STEPS = ("env", "data", "gpu_tests", "ddp_world_one", "train_resnet50", "train_compile", "profile",
                 "inference", "other_models")  # fmt: skip
DALI_STEPS = ("env", "data", "dali_tests", "train_dali")
DEADLINE_S = 540  # the 600 s command limit less a minute: DALI's unpacking, Python's start, the copy back
DRY_DEADLINE_S = 900  # caps for a loaded 2-core machine; about a minute is expected when idle
GRACE_S = 5  # after SIGTERM, before SIGKILL


def limits(dry: bool, overrides: str = "") -> dict[str, float]:
    """Each step's limit in seconds, with ``GPU_SESSION_LIMITS``-style overrides (``name=seconds,...``)."""
    got = {s.name: s.dry_limit_s if dry else s.limit_s for s in STEPS}
    for item in filter(None, (v.strip() for v in overrides.split(","))):
        name, _, seconds = item.partition("=")
        if name not in got:
            raise SystemExit(f"GPU_SESSION_LIMITS: unknown step {name!r} (known: {', '.join(got)})")
        got[name] = float(seconds)
    return got


class Session:
    """Runs steps one after another and keeps ``results.json`` and ``session.log`` up to date."""

    def __init__(self, out: Path, work: Path, dry: bool, step_limits: dict[str, float], deadline_s: float):
        self.out, self.work, self.dry = out, work, dry
        self.step_limits, self.deadline = step_limits, time.monotonic() + deadline_s
        self.log_path = out / "session.log"
        self.results = {
            "session": {"dry": dry, "argv": sys.argv, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                        "limits_s": step_limits, "deadline_s": deadline_s, "out": str(out), "work": str(work)},
            "steps": [],
        }  # fmt: skip

    def say(self, text: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {text}"
        print(line, flush=True)
        with open(self.log_path, "a") as f:
            f.write(line + "\n")

    def save(self) -> None:
        atomic_write_text(self.out / "results.json", json.dumps(self.results, indent=2, default=str))

    def run(self, names: list[str]) -> dict:
        self.say(f"gpu_session: {'DRY (CPU, tiny sizes)' if self.dry else 'GPU'} run of {', '.join(names)}; "
                 f"out {self.out}, work {self.work}")  # fmt: skip
        self.save()
        for name in names:
            left = self.deadline - time.monotonic()
            limit = min(self.step_limits[name], max(0.0, left - GRACE_S))
            if limit < 1:
                entry = {"name": name, "status": "skipped", "reason": "no time left before the session's deadline"}
            else:
                if limit < self.step_limits[name]:
                    self.say(f"{name}: limit cut to {limit:.0f} s by the session's deadline")
                entry = self.run_step(BY_NAME[name], limit)
            self.results["steps"].append(entry)
            self.save()
            self.say(f"{name}: {entry['status']}" + (f" ({entry['reason']})" if entry.get("reason") else "")
                     + (f" in {entry['seconds']:.1f} s" if "seconds" in entry else ""))  # fmt: skip
        self.say(summary(self.results))
        return self.results

    def run_step(self, step: Step, limit: float) -> dict:
        records_path = self.work / f"{step.name}.jsonl"
        error_path = self.work / f"{step.name}.error"
        for p in (records_path, error_path):
            p.unlink(missing_ok=True)
        self.say(f"{step.name}: start (limit {limit:.0f} s): {step.what}")
        sys.stdout.flush()
        sys.stderr.flush()
        start = time.monotonic()
        pid = os.fork()
        if pid == 0:  # the child: its own process group, so that a kill takes its workers and tools along
            os._exit(self._child(step, records_path, error_path))
        timed_out, code = _wait_or_stop(pid, limit)
        records = [json.loads(line) for line in records_path.read_text().splitlines()] if records_path.exists() else []
        entry = {"name": step.name, "what": step.what, "limit_s": limit, "seconds": time.monotonic() - start,
                 "exit_code": code, "records": records}  # fmt: skip
        failed = [r["name"] for r in records if r.get("status") == "failed"]
        if timed_out:
            entry |= {"status": "timed_out", "reason": f"stopped at its {limit:.0f} s limit after {len(records)} "
                                                       "measurements"}  # fmt: skip
        elif code != 0:
            error = error_path.read_text().strip().splitlines()[-1] if error_path.exists() else f"exit code {code}"
            entry |= {"status": "failed", "reason": error}
        elif failed:
            entry |= {"status": "failed", "reason": f"failed: {', '.join(failed)}"}
        elif records and all(r.get("status") == "skipped" for r in records):
            entry |= {"status": "skipped", "reason": "; ".join(sorted({r.get("reason", "?") for r in records}))}
        else:
            entry["status"] = "ok"
        return entry

    def _child(self, step: Step, records_path: Path, error_path: Path) -> int:
        os.setsid()
        fd = os.open(self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        try:
            from benchmarks import gpu_steps

            ctx = gpu_steps.Context(dry=self.dry, work=self.work, out=self.out, records_path=records_path,
                                    previous=self.results["steps"])  # fmt: skip
            run_step(step.name, ctx)
            return 0
        except BaseException:  # noqa: BLE001 - whatever it was, it goes to the log and the results, not further
            error_path.write_text(traceback.format_exc())
            traceback.print_exc()
            return 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()


def _exit_code_within(pid: int, seconds: float) -> int | None:
    """The child's exit code if it ends within ``seconds``, else None."""
    end = time.monotonic() + seconds
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() >= end:
            return None
        time.sleep(0.05)


def _wait_or_stop(pid: int, limit: float) -> tuple[bool, int]:
    """(timed out, exit code) of the child: waited for up to ``limit`` seconds, then stopped with its process
    group (SIGTERM, then SIGKILL after ``GRACE_S``)."""
    code = _exit_code_within(pid, limit)
    if code is not None:
        return False, code
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            pass
        code = _exit_code_within(pid, GRACE_S)
        if code is not None:
            return True, code
    return True, os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def summary(results: dict) -> str:
    """The table printed last (the call's reply carries the end of the output)."""
    rows = ["step               status      seconds  headline"]
    for entry in results["steps"]:
        heads = [r["headline"] for r in entry.get("records", []) if r.get("headline")]
        rows.append(f"{entry['name']:<18} {entry['status']:<11} {entry.get('seconds', 0):>7.1f}  "
                    f"{'; '.join(heads)[:160] or entry.get('reason', '')}")  # fmt: skip
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=os.environ.get("OUT"), help="results folder (default: $OUT)")
    p.add_argument("--work", type=Path, help="scratch: generated JPEGs, per-step files (default: a temp folder)")
    p.add_argument("--dry", action=argparse.BooleanOptionalAction, default=os.environ.get("DRY") == "1",
                   help="CPU, tiny sizes, same steps (default: $DRY=1)")  # fmt: skip
    p.add_argument("--steps", help=f"comma-separated (default: {','.join(DEFAULT_STEPS)}; 'dali': "
                                   f"{','.join(DALI_STEPS)})")  # fmt: skip
    p.add_argument("--deadline", type=float, help=f"seconds for the whole session (default: {DEADLINE_S}, "
                                                  f"--dry {DRY_DEADLINE_S})")  # fmt: skip
    args = p.parse_args(argv)
    if args.out is None:
        p.error("give --out or set OUT")
    names = DALI_STEPS if args.steps == "dali" else tuple(args.steps.split(",")) if args.steps else DEFAULT_STEPS
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        p.error(f"--steps: unknown {', '.join(unknown)} (known: {', '.join(BY_NAME)})")
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.work or Path(tempfile.gettempdir()) / ("gpu-session-dry" if args.dry else "gpu-session")
    work.mkdir(parents=True, exist_ok=True)
    # Imported here, once, so that every forked step starts with them loaded (torch alone takes seconds);
    # none of them initialises CUDA, which a fork must not inherit.
    import benchmarks.gpu_measure  # noqa: F401 - and gpu_steps, common.benchmark, torch

    deadline = args.deadline or (DRY_DEADLINE_S if args.dry else DEADLINE_S)
    session = Session(args.out, work, args.dry, limits(args.dry, os.environ.get("GPU_SESSION_LIMITS", "")), deadline)
    results = session.run(list(names))
    return 0 if all(s["status"] in ("ok", "skipped") for s in results["steps"]) else 1


def step_functions() -> dict:
    """Each step's function, by the name the table gives it."""
    from benchmarks import gpu_measure
    from benchmarks.gpu_steps import data, ddp_world_one, env, gpu_tests, profile

    return {
        "env": env,
        "data": data,
        "gpu_tests": gpu_tests,
        "ddp_world_one": ddp_world_one,
        "train_resnet50": gpu_measure.train_resnet50,
        "train_compile": gpu_measure.train_compile,
        "profile": profile,
        "inference": gpu_measure.inference,
        "other_models": gpu_measure.other_models,
        "dali_tests": functools.partial(gpu_tests, select="dali"),
        "train_dali": functools.partial(
            gpu_measure.train_resnet50, backends=("dali-gpu", "dali-cpu"), baselines=False
        ),  # fmt: skip
    }


def run_step(name: str, ctx) -> None:
    """Run step ``name`` (in the forked child)."""
    from benchmarks import gpu_steps

    if ctx.dry:
        gpu_steps.dry_compile()
    step_functions()[name](ctx)


if __name__ == "__main__":
    sys.exit(main())
