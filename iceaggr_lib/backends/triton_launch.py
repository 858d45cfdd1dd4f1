"""Launch a compiled Triton kernel with less host time than ``kernel[grid](...)``.

Why: at IceCube batch sizes up to ~1,000 events a ``dom_fused`` call's GPU work is ~0.05-0.11 ms,
and ``JITFunction.run`` (bind the arguments, specialise each, build the cache key with ``str(options)``,
build launch metadata, call the launch hooks) costs tens of µs per launch on the host, so a stream of
calls is bound by the host, not the GPU (docs/dom_fused_notes.md, "Host dispatch").

``FastLaunch(jit_fn)`` keeps the ``CompiledKernel`` that Triton's own launch returned, keyed by what
Triton specialises on: for every runtime argument, ``native_specialize_impl`` (the C function the JIT
binder calls: dtype and 16-byte alignment of a tensor, i32/i64 and divisibility by 16 / equality to 1 of
an int), the constexpr values, ``num_warps`` and the device. A key seen before is launched straight
through ``CompiledKernel.run``; a new one goes through ``jit_fn[grid](...)``, which compiles (or finds)
the kernel and launches it, and is then remembered. So the kernel that runs is always the one Triton
would have chosen.

The plain path is used whenever the fast one cannot be trusted: under ``TRITON_INTERPRET`` (the kernel
is an interpreter function), when launch hooks are registered (a profiler such as proton wants them
called), or with a Triton whose internals differ from the 3.x ones used here (checked once). Not in the
key: Triton's compile options from the environment (``TRITON_DEBUG``, instrumentation); change those
before the first launch of a process, or set ``ENABLED = False``.
"""

from __future__ import annotations

import os

import torch

# The package's one optional import of Triton (on the GPU image; the CPU CI venv may lack it, and the backend
# registry must still import): dom_fused, dom_classes and fused_projection take triton, tl and HAVE_TRITON from here.
try:
    import triton
    import triton.language as tl
    from triton.runtime.errors import OutOfResources
    from triton.runtime.jit import JITFunction
    HAVE_TRITON = True
except ImportError:  # pragma: no cover - the CPU CI venv may lack triton
    triton = None
    tl = None
    HAVE_TRITON = False
    OutOfResources = ()  # (an except clause with an empty tuple catches nothing)


ENABLED = True  # False: always the plain ``kernel[grid](...)`` (A/B timing; scripts/compile_check.py)


def _fast_path_available() -> bool:
    """True when this Triton exposes what the direct launch needs (3.x: knobs hook chains, C specialiser)."""
    if not HAVE_TRITON or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return False
    try:
        from triton import knobs  # noqa: F401
        from triton._C.libtriton import native_specialize_impl  # noqa: F401
    except ImportError:
        return False
    return True


def _hooked(hook) -> bool:
    """A launch hook is registered: Triton 3.6 keeps a HookChain (its ``calls`` list), older 3.x None or a function."""
    return bool(getattr(hook, "calls", hook))


def _current_stream(device: int) -> int:
    """The raw handle of the current CUDA stream (the call Triton's own driver makes)."""
    return torch._C._cuda_getCurrentRawStream(device)


class FastLaunch:
    """``FastLaunch(jit_fn)(grid, args, constexprs, num_warps)`` == ``jit_fn[grid](*args, **constexprs,
    num_warps=num_warps)`` (and ``num_stages`` if given), with the host work of a repeated launch cut to the specialisation key and the
    C launcher. ``args``: the runtime arguments in signature order; ``constexprs``: the rest, by name."""

    def __init__(self, jit_fn, owner: str = "triton"):
        self.jit_fn = jit_fn
        self.owner = owner  # named in errors: the backend whose kernel this is
        self.kernels: dict = {}
        self.fast_launches = 0  # launches that took the direct path (tests check the fast path ran)
        self._ok = None  # decided at the first launch (the module may be imported before CUDA is set up)
        if HAVE_TRITON and isinstance(jit_fn, JITFunction):
            self._names = [p.name for p in jit_fn.params]
            self._n_runtime = sum(1 for p in jit_fn.params if not p.is_constexpr)

    def _usable(self) -> bool:
        if self._ok is None:
            self._ok = (_fast_path_available() and isinstance(self.jit_fn, JITFunction)
                        and all(not p.is_constexpr for p in self.jit_fn.params[:self._n_runtime]))
            if self._ok:
                from triton import knobs
                from triton._C.libtriton import native_specialize_impl
                self._knobs, self._spec = knobs, native_specialize_impl
        return self._ok

    def specialize(self, args: tuple):
        """The specialisation key of ``args`` (what JITFunction's binder computes: is_const False, specialise
        and align True, as for every parameter of our kernels), or None when the plain path is to be taken.
        Launches that share their runtime arguments can share it (``dom_fused``'s two tile levels do)."""
        if not ENABLED or not self._usable() or _hooked(self._knobs.runtime.launch_enter_hook) \
                or _hooked(self._knobs.runtime.launch_exit_hook):
            return None
        device = torch.cuda.current_device()
        backend = self.jit_fn.device_caches[device][3]  # the backend object the JIT binder specialises with
        spec = self._spec
        return device, tuple(spec(backend, a, False, True, True) for a in args)

    @staticmethod
    def _options(num_warps, num_stages, maxnreg=None):
        options = dict(num_warps=num_warps)
        if num_stages is not None:
            options["num_stages"] = num_stages
        if maxnreg is not None:  # ptxas' register cap per thread (more programs per SM, perhaps spills)
            options["maxnreg"] = maxnreg
        return options

    def _plain(self, grid, args, constexprs, num_warps, num_stages, maxnreg=None):
        """Triton's own launch; a kernel that does not fit the GPU (shared memory, registers) is reported with
        its owner, name and settings, which Triton's message leaves out."""
        try:
            return self.jit_fn[grid](*args, **constexprs, **self._options(num_warps, num_stages, maxnreg))
        except OutOfResources as e:
            name = getattr(self.jit_fn, "__name__", type(self.jit_fn).__name__)
            cap = "" if maxnreg is None else f", registers capped at {maxnreg} per thread"
            raise RuntimeError(f"{self.owner}: kernel {name} with {constexprs}, num_warps={num_warps}, "
                               f"num_stages={num_stages} does not fit this GPU ({e}{cap}); a smaller block or "
                               f"fewer stages would") from e

    def __call__(self, grid: tuple, args: tuple, constexprs: dict, num_warps: int, spec=False, num_stages=None,
                 maxnreg=None):
        """Launch; ``spec``: from ``specialize(args)`` when the caller has it already; ``num_stages``: None
        for Triton's default; ``maxnreg``: None, or a cap on the registers per thread."""
        if spec is False:
            spec = self.specialize(args)
        if spec is None:
            return self._plain(grid, args, constexprs, num_warps, num_stages, maxnreg)
        key = (spec, tuple(constexprs.values()), num_warps, num_stages, maxnreg)
        kernel = self.kernels.get(key)
        if kernel is None:  # Triton's own launch compiles (or finds) the kernel and launches it
            kernel = self._plain(grid, args, constexprs, num_warps, num_stages, maxnreg)
            self.kernels[key] = kernel
            return kernel
        full = list(args)
        for name in self._names[self._n_runtime:]:
            full.append(constexprs[name])
        kernel.run(grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1,
                   _current_stream(spec[0]), kernel.function, kernel.packed_metadata, None, None, None,
                   *full)
        self.fast_launches += 1
        return kernel


_SIDE: dict = {}  # device index -> (side stream, its ids, fork event, join event)
_STREAMS: dict = {}  # (stream id, device index, device type) -> torch.cuda.Stream, for the current stream


def _current_stream_object(idx: int):
    """The current CUDA stream of device ``idx`` as a ``torch.cuda.Stream`` (and its ids), made once per stream:
    ``torch.cuda.current_stream()`` resolves the device and builds a new Python object at every call, which
    costs ~10-20 µs on the lent H100's host (cProfile, session 5), on every forward that forks."""
    ids = torch._C._cuda_getCurrentStream(idx)
    stream = _STREAMS.get(ids)
    if stream is None:
        if len(_STREAMS) > 64:  # a program that makes streams by the thousand: keep the cache small
            _STREAMS.clear()
        stream = _STREAMS[ids] = torch.cuda.Stream(stream_id=ids[0], device_index=ids[1], device_type=ids[2])
    return stream, ids


def run_concurrently(device: torch.device, on_current, on_side) -> None:
    """``on_current()`` on the current CUDA stream and ``on_side()`` on a side stream at the same time, both
    after all work issued so far, and everything issued later on the current stream after both: a fork and
    a join through two events, no host synchronisation (CUDA-graph capture records them as dependencies).

    Why: a launch whose programs are uneven (a few long large-DOM programs among many short ones) leaves
    most SMs idle during its tail; a second, independent launch on another stream fills them. Tensors
    made on the current stream may be used in ``on_side``: the join orders any later reuse of their
    memory after it. The stream switch is the raw ``_cuda_setStream`` (what ``torch.cuda.stream(...)`` does
    after its Python checks), restored in a ``finally``."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    side = _SIDE.get(idx)
    if side is None:
        stream = torch.cuda.Stream(idx)
        side = _SIDE[idx] = (stream, (stream.stream_id, stream.device_index, stream.device_type),
                             torch.cuda.Event(), torch.cuda.Event())
    stream, side_ids, fork, join = side
    current, ids = _current_stream_object(idx)
    fork.record(current)
    stream.wait_event(fork)
    on_current()
    torch._C._cuda_setStream(stream_id=side_ids[0], device_index=side_ids[1], device_type=side_ids[2])
    try:
        on_side()
    finally:
        torch._C._cuda_setStream(stream_id=ids[0], device_index=ids[1], device_type=ids[2])
    join.record(stream)
    current.wait_event(join)
