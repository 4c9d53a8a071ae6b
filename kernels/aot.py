"""Ahead-of-time compiles of every Triton launch, for real GPUs, on a machine without one.

Triton's interpreter (``TRITON_INTERPRET=1``, how CI runs the kernels) accepts code that the
compiler refuses: module globals that are plain ints, loop-carried variables that change type.
So the tests record what they launch and this module compiles it for real GPUs:

1. :class:`LaunchRecorder` wraps the launch of every ``@triton.jit`` kernel (interpreted or
   compiled) and stores the specialization compiled Triton derives for it, with Triton's own
   binder: each argument's type (``*bf16``, ``i32``, ``i64``, ``u64``, ``constexpr`` for an int
   equal to 1 ...), its 16-divisibility (``D``), the constexpr values and the launch options
   (num_warps, num_stages). Identical launches are stored once (:class:`Spec`).
2. :func:`compile_specs` compiles each spec with ``triton.compile(ASTSource(...),
   target=GPUTarget("cuda", arch, 32))`` in one subprocess per architecture (a clean
   environment: no ``TRITON_INTERPRET``, no ``TRITON_ALLOW_NON_CONSTEXPR_GLOBALS``, a fresh
   ``TRITON_CACHE_DIR``, since the latter variable is not part of Triton's cache key). ptxas's own
   ``-v`` report gives registers and spill bytes per kernel. ``python_path`` runs the workers
   against another Triton install (``pip install --target DIR triton==X``).

Nothing here imports the rest of the project; the kernels' modules are imported by name in the
workers. This file is also the worker: ``python aot.py JOB.json RESULT.json``.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

ARCHS = (80, 86, 89, 90)
# Keywords of KernelInterface.run that are neither kernel arguments nor compile options.
_GRID_KEYS = ("grid", "warmup")


# ---------------------------------------------------------------------------------------------
# specializations
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    """One compiled-Triton specialization of a kernel, JSON-friendly and hashable.

    ``params``: per argument (name, type, attribute): type as the JIT specializes it (``*u8``,
    ``i32``, ``constexpr``...), attribute ``"D"`` when it is 16-divisible (pointers: the address;
    ints: the value), else ``""``. ``constexprs``: (name, value) for every constexpr argument,
    those declared ``tl.constexpr`` and ints specialized to 1. ``options``: launch options
    (``num_warps``...) as given at the launch; the backend fills in its defaults.
    """

    module: str
    name: str
    params: tuple[tuple[str, str, str], ...]
    constexprs: tuple[tuple[str, Any], ...]
    options: tuple[tuple[str, Any], ...]

    def describe(self) -> str:
        """``_decode_kernel(words_ptr: *i16/D, n: i32, CHUNK=65536, ...; num_warps=1)``."""
        values = dict(self.constexprs)
        args = []
        for name, ty, attr in self.params:
            if ty == "constexpr":
                args.append(f"{name}={values[name]!r}")
            else:
                args.append(f"{name}: {ty}{'/' + attr if attr else ''}")
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options)
        return f"{self.name}({', '.join(args)}{'; ' + opts if opts else ''})"

    def to_json(self) -> dict[str, Any]:
        return {
            "module": self.module,
            "name": self.name,
            "params": [list(p) for p in self.params],
            "constexprs": [[k, _json_value(v)] for k, v in self.constexprs],
            "options": [[k, _json_value(v)] for k, v in self.options],
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Spec:
        return cls(
            module=d["module"],
            name=d["name"],
            params=tuple(tuple(p) for p in d["params"]),
            constexprs=tuple((k, v) for k, v in d["constexprs"]),
            options=tuple((k, v) for k, v in d["options"]),
        )


def _json_value(v: Any) -> Any:
    """Constexpr values: ints, floats, bools, None and strings pass; Triton dtypes by name."""
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if type(v).__name__ == "constexpr":
        return _json_value(v.value)
    if type(v).__name__ == "dtype" and hasattr(v, "name"):
        return {"dtype": v.name}
    raise TypeError(f"constexpr value {v!r} ({type(v).__name__}) cannot be recorded")


def _from_json_value(v: Any) -> Any:
    if isinstance(v, dict) and "dtype" in v:
        import triton.language as tl

        return tl.dtype(v["dtype"])
    return v


def _unwrap(v: Any) -> Any:
    return v.value if type(v).__name__ == "constexpr" else v


class _Specializer:
    """Triton's own binder for one kernel, as the CUDA JIT builds it (sm_90 backend: the CUDA
    backends of every architecture specialize arguments alike)."""

    def __init__(self, fn: Callable, jit_kwargs: dict[str, Any]) -> None:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend
        from triton.runtime import jit

        # A JITFunction made only for its parameter list (do_not_specialize... as declared);
        # it is never compiled or launched.
        keep = ("do_not_specialize", "do_not_specialize_on_alignment")
        self.jit_fn = jit.JITFunction(fn, **{k: v for k, v in jit_kwargs.items() if k in keep})
        self.backend = make_backend(GPUTarget("cuda", 90, 32))
        self.binder = jit.create_function_from_signature(
            self.jit_fn.signature, self.jit_fn.params, self.backend
        )
        self.names = [p.name for p in self.jit_fn.params]

    def spec(self, args: Sequence[Any], kwargs: dict[str, Any]) -> Spec:
        bound, specialization, options = self.binder(*args, **kwargs)
        values = list(bound.values())
        params, constexprs = [], []
        for name, value, (ty, attr) in zip(self.names, values, specialization, strict=True):
            if isinstance(ty, (tuple, list)):
                raise TypeError(f"argument {name}: tuple arguments are not supported")
            if ty == "constexpr":
                constexprs.append((name, _json_value(_unwrap(value))))
            params.append((name, ty, attr if isinstance(attr, str) else ""))
        opts = tuple(sorted((k, _json_value(v)) for k, v in options.items()))
        return Spec(
            module=self.jit_fn.fn.__module__,
            name=self.jit_fn.fn.__qualname__,
            params=tuple(params),
            constexprs=tuple(constexprs),
            options=opts,
        )


class LaunchRecorder:
    """Records the specialization of every Triton launch while installed.

    The wrapper costs a dict lookup and Triton's binder (microseconds) per launch; the kernel
    itself then runs as before. A failure to record never breaks the launch: it is kept in
    ``errors`` for the compile test to report.
    """

    def __init__(self) -> None:
        self._specs: dict[Spec, int] = {}  # insertion-ordered, with launch counts
        self._specializers: dict[int, _Specializer] = {}
        self._saved: list[tuple[type, Callable]] = []
        self._lock = threading.Lock()
        self.errors: list[str] = []

    # -- installation -----------------------------------------------------------------------

    def install(self) -> LaunchRecorder:
        """Wrap the launch of interpreted and compiled kernels (idempotent)."""
        if self._saved:
            return self
        from triton.runtime import interpreter, jit

        for cls in (interpreter.InterpretedFunction, jit.JITFunction):
            original = cls.__dict__["run"]
            self._saved.append((cls, original))
            cls.run = self._wrap(original)
        return self

    def uninstall(self) -> None:
        for cls, original in reversed(self._saved):
            cls.run = original
        self._saved.clear()

    @contextlib.contextmanager
    def recording(self) -> Iterator[LaunchRecorder]:
        """Installed for the duration of the block (left installed if it already was)."""
        was = bool(self._saved)
        self.install()
        try:
            yield self
        finally:
            if not was:
                self.uninstall()

    def _wrap(self, original: Callable) -> Callable:
        recorder = self

        def run(kernel, *args, **kwargs):
            if not kwargs.get("warmup", False):
                recorder._record(kernel, args, kwargs)
            return original(kernel, *args, **kwargs)

        run.__wrapped__ = original  # type: ignore[attr-defined]
        return run

    # -- recording --------------------------------------------------------------------------

    def _record(self, kernel: Any, args: tuple, kwargs: dict[str, Any]) -> None:
        try:
            fn = kernel.fn
            specializer = self._specializers.get(id(fn))
            if specializer is None:
                jit_kwargs = dict(getattr(kernel, "kwargs", {}) or {})
                for key in ("do_not_specialize", "do_not_specialize_on_alignment"):
                    if getattr(kernel, key, None):
                        jit_kwargs[key] = getattr(kernel, key)
                specializer = _Specializer(fn, jit_kwargs)
                self._specializers[id(fn)] = specializer
            launch = {k: v for k, v in kwargs.items() if k not in _GRID_KEYS}
            spec = specializer.spec(args, launch)
        except Exception as e:  # recorded, reported by the compile test
            name = getattr(getattr(kernel, "fn", None), "__qualname__", repr(kernel))
            with self._lock:
                self.errors.append(f"{name}: {type(e).__name__}: {e}")
            return
        with self._lock:
            self._specs[spec] = self._specs.get(spec, 0) + 1

    def specs(self) -> list[Spec]:
        """Unique specializations, in first-launch order."""
        with self._lock:
            return list(self._specs)

    @property
    def launches(self) -> int:
        with self._lock:
            return sum(self._specs.values())

    def clear(self) -> None:
        with self._lock:
            self._specs.clear()
            self.errors.clear()


# ---------------------------------------------------------------------------------------------
# compiling (parent side)
# ---------------------------------------------------------------------------------------------


@dataclass
class CompileResult:
    """One spec compiled for one architecture. ``error`` is None when it compiled."""

    spec: Spec
    arch: int
    error: str | None = None
    registers: int | None = None
    spill_stores: int | None = None  # bytes, from ptxas -v
    spill_loads: int | None = None
    shared: int | None = None  # bytes of shared memory (Triton's metadata)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def spills(self) -> int:
        return (self.spill_stores or 0) + (self.spill_loads or 0)


@dataclass
class CompileReport:
    results: list[CompileResult] = field(default_factory=list)
    triton_version: str = ""
    seconds: float = 0.0

    def failures(self) -> list[CompileResult]:
        return [r for r in self.results if not r.ok]

    def spilling(self, kernels: Iterable[str] | None = None) -> list[CompileResult]:
        names = None if kernels is None else set(kernels)
        return [
            r for r in self.results if r.ok and r.spills and (names is None or r.spec.name in names)
        ]


def _import_root(module: str) -> str | None:
    """The sys.path entry from which ``module`` imports as the parent imported it, if any
    (None for modules found through installed packages, e.g. an editable install's mapping)."""
    path = getattr(sys.modules.get(module), "__file__", None)
    if not path:
        return None
    file = Path(path).resolve()
    parts = module.split(".")
    root = file.parent
    for _ in range(len(parts) - (0 if file.name == "__init__.py" else 1)):
        root = root.parent
    tail = Path(*parts) / "__init__.py" if file.name == "__init__.py" else Path(*parts[:-1])
    expected = root / tail if file.name == "__init__.py" else root / tail / file.name
    return str(root) if expected == file else None


def _worker_env(cache_dir: str, python_path: Sequence[str]) -> dict[str, str]:
    """The parent's environment without any TRITON_* setting, plus a fresh cache directory.

    TRITON_INTERPRET would make ``triton.jit`` build interpreter objects; TRITON_ALLOW_NON_-
    CONSTEXPR_GLOBALS would hide the errors this check exists for (and is not in the cache key).
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRITON_")}
    env["TRITON_CACHE_DIR"] = cache_dir
    env["TRITON_DUMP_PTXAS_LOG"] = "1"  # ptxas -v output, printed by Triton, parsed by the worker
    paths = [*python_path, *env.get("PYTHONPATH", "").split(os.pathsep)]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    return env


def compile_specs(
    specs: Sequence[Spec],
    archs: Sequence[int] = ARCHS,
    *,
    python_path: Sequence[str] = (),
    python: str = sys.executable,
    workers: int = 2,
    timeout: float = 600.0,
) -> CompileReport:
    """Compile every spec for every architecture, one subprocess per architecture.

    ``python_path`` goes in front of the workers' PYTHONPATH: point it at a ``pip install
    --target`` tree to compile with another Triton version. Raises RuntimeError naming the
    architecture when a worker dies (an import error, a crash) instead of reporting.
    """
    if not archs:
        raise ValueError("archs must name at least one architecture, got none")
    specs = list(specs)
    plan = {arch: specs for arch in archs}
    return compile_plan(
        plan, python_path=python_path, python=python, workers=workers, timeout=timeout
    )


def compile_plan(
    plan: Mapping[int, Sequence[Spec]],
    *,
    python_path: Sequence[str] = (),
    python: str = sys.executable,
    workers: int = 2,
    timeout: float = 600.0,
) -> CompileReport:
    """Compile each architecture's specs (``plan``: arch -> specs), one subprocess per
    architecture, the longest lists first; otherwise as :func:`compile_specs`."""
    plan = {arch: list(dict.fromkeys(specs)) for arch, specs in plan.items()}
    roots = {r for specs in plan.values() for r in (_import_root(s.module) for s in specs) if r}
    started = time.perf_counter()
    report = CompileReport()
    archs = sorted((a for a in plan if plan[a]), key=lambda a: -len(plan[a]))
    if not archs:
        return report
    with tempfile.TemporaryDirectory(prefix="nz_aot_") as tmp:

        def run(arch: int) -> dict[str, Any]:
            job_path = Path(tmp) / f"job_{arch}.json"
            out_path = Path(tmp) / f"result_{arch}.json"
            job = {"specs": [s.to_json() for s in plan[arch]], "paths": sorted(roots)}
            job_path.write_text(json.dumps({**job, "arch": arch}))
            cache = Path(tmp) / f"cache_{arch}"
            try:
                proc = subprocess.run(
                    [python, str(Path(__file__).resolve()), str(job_path), str(out_path)],
                    env=_worker_env(str(cache), list(python_path)),
                    capture_output=True,
                    text=True,
                    timeout=timeout,
                    check=False,
                )
            except subprocess.TimeoutExpired as e:
                raise RuntimeError(f"the compile worker for sm_{arch} ran past {timeout} s") from e
            if proc.returncode != 0 or not out_path.exists():
                raise RuntimeError(
                    f"the compile worker for sm_{arch} failed (exit {proc.returncode}):\n"
                    f"{proc.stderr[-4000:]}"
                )
            return json.loads(out_path.read_text())

        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            outputs = list(pool.map(run, archs))
    for out in sorted(outputs, key=lambda o: o["arch"]):
        report.triton_version = out["triton"]
        for spec, r in zip(plan[out["arch"]], out["results"], strict=True):
            report.results.append(CompileResult(spec=spec, arch=out["arch"], **r))
    report.seconds = time.perf_counter() - started
    log.info(
        "compiled %s in %.1f s (triton %s): %d failed",
        ", ".join(f"{len(plan[a])} specializations for sm_{a}" for a in sorted(archs)),
        report.seconds,
        report.triton_version,
        len(report.failures()),
    )
    return report


# ---------------------------------------------------------------------------------------------
# compiling (worker side)
# ---------------------------------------------------------------------------------------------

_REGS = re.compile(r"Used (\d+) registers")
_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def parse_ptxas_log(text: str) -> dict[str, int | None]:
    """Registers and spill bytes from ``ptxas -v`` (the largest over the functions it lists)."""
    regs = [int(m) for m in _REGS.findall(text)]
    spills = [(int(a), int(b)) for a, b in _SPILLS.findall(text)]
    return {
        "registers": max(regs) if regs else None,
        "spill_stores": max((s for s, _ in spills), default=None),
        "spill_loads": max((ld for _, ld in spills), default=None),
    }


def _ast_source(fn: Any, spec: Spec, backend: Any) -> Any:
    """``ASTSource`` for this Triton version: constexprs and attrs keyed by argument path
    ``(i,)`` (Triton >= 3.2), or by name with an AttrsDescriptor (older)."""
    from triton.compiler import ASTSource

    index = {name: i for i, (name, _, _) in enumerate(spec.params)}
    signature = {name: ty for name, ty, _ in spec.params}
    constexprs = {name: _from_json_value(v) for name, v in spec.constexprs}
    init = inspect.signature(ASTSource.__init__).parameters
    if "constexprs" in init:
        attrs = {(index[n],): backend.parse_attr(a) for n, _, a in spec.params if a}
        return ASTSource(
            fn, signature, constexprs={(index[n],): v for n, v in constexprs.items()}, attrs=attrs
        )
    # Triton 3.0/3.1: constants by name, divisibility as an AttrsDescriptor
    from triton.compiler.compiler import AttrsDescriptor

    divisible = tuple(index[n] for n, ty, a in spec.params if a == "D" and ty != "constexpr")
    sig = {n: ty for n, ty in signature.items() if ty != "constexpr"}
    return ASTSource(
        fn, sig, constants=constexprs, attrs=AttrsDescriptor(divisible_by_16=divisible)
    )


def _short_error(e: BaseException) -> str:
    """The exception type and its informative last lines (Triton prefixes a source excerpt)."""
    text = str(e).strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    tail = " | ".join(lines[-3:]) if lines else ""
    cause = e.__cause__ or e.__context__
    if cause is not None and str(cause) and str(cause) not in tail:
        tail = f"{tail} | caused by {type(cause).__name__}: {str(cause).strip().splitlines()[-1]}"
    return f"{type(e).__name__}: {tail}"[:1500]


def _compile_one(spec: Spec, arch: int) -> dict[str, Any]:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    started = time.perf_counter()
    target = GPUTarget("cuda", arch, 32)
    out: dict[str, Any] = {"error": None}
    ptxas_log = io.StringIO()
    try:
        fn = getattr(importlib.import_module(spec.module), spec.name)
        if not hasattr(fn, "arg_names") or not hasattr(fn, "params"):
            raise TypeError(f"{spec.module}.{spec.name} is not a compiled-Triton JITFunction")
        src = _ast_source(fn, spec, make_backend(target))
        options = {k: _from_json_value(v) for k, v in spec.options}
        with contextlib.redirect_stdout(ptxas_log):
            kernel = triton.compile(src, target=target, options=options)
        stats = parse_ptxas_log(ptxas_log.getvalue())
        if stats["registers"] is None:  # this Triton does not print the ptxas log: run it again
            stats = parse_ptxas_log(_rerun_ptxas(kernel.asm["ptx"], arch))
        out.update(stats)
        out["shared"] = int(getattr(kernel.metadata, "shared", 0) or 0)
    except Exception as e:
        out["error"] = _short_error(e)
    out["seconds"] = time.perf_counter() - started
    return out


def _rerun_ptxas(ptx: str, arch: int) -> str:
    from triton.backends.nvidia import compiler as nv

    ptxas = nv.get_ptxas(arch).path if hasattr(nv, "get_ptxas") else nv._path_to_binary("ptxas")[0]
    gpu = nv.sm_arch_from_capability(arch)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        proc = subprocess.run(
            [ptxas, "-v", f"--gpu-name={gpu}", str(src), "-o", str(Path(tmp) / "k.o")],
            capture_output=True,
            text=True,
            check=False,
        )
    return proc.stdout + proc.stderr


def _worker(job_path: str, out_path: str) -> None:
    job = json.loads(Path(job_path).read_text())
    for p in reversed(job["paths"]):
        if p not in sys.path:
            sys.path.insert(0, p)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("the compile worker must run without TRITON_INTERPRET")
    import triton

    specs = [Spec.from_json(d) for d in job["specs"]]
    results = [_compile_one(s, job["arch"]) for s in specs]
    Path(out_path).write_text(
        json.dumps({"arch": job["arch"], "triton": triton.__version__, "results": results})
    )


def report_rows(report: CompileReport) -> list[dict[str, Any]]:
    """Per kernel: specializations, per-arch "ok" / "k/n failed", max registers, max spills."""
    rows: dict[str, dict[str, Any]] = {}
    archs = sorted({r.arch for r in report.results})
    for r in report.results:
        row = rows.setdefault(
            r.spec.name,
            {
                "kernel": r.spec.name,
                "specs": set(),
                "failed": {},
                "total": {},
                "regs": 0,
                "spills": 0,
            },
        )
        row["specs"].add(r.spec)
        row["total"][r.arch] = row["total"].get(r.arch, 0) + 1
        if not r.ok:
            row["failed"][r.arch] = row["failed"].get(r.arch, 0) + 1
        row["regs"] = max(row["regs"], r.registers or 0)
        row["spills"] = max(row["spills"], r.spills)
    out = []
    for row in rows.values():
        cells = {
            f"sm_{a}": (
                "OK" if not row["failed"].get(a) else f"{row['failed'][a]}/{row['total'][a]} failed"
            )
            for a in archs
        }
        out.append(
            {
                "kernel": row["kernel"],
                "specs": len(row["specs"]),
                **cells,
                "max regs": row["regs"],
                "spill B": row["spills"],
            }
        )
    return out


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: aot.py JOB.json RESULT.json  (the worker of compile_specs)")
    _worker(sys.argv[1], sys.argv[2])
