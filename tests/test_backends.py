"""Every attention backend vs the float64 reference: forward and gradients (dq, dk, dv).

Each test draws a fresh seed (printed in its failure message), so repeated runs check new inputs.
Tolerances are the developers' guide's (``iceaggr_lib.testing.TOLERANCE``): 1e-5 fp32 with tf32 off,
1e-2 bf16/fp16. CPU cases run in CI and are kept small; compiled FlexAttention on CPU compiles for
~10-25 s, so only one small compiled-flex case (flex_block) runs there. CUDA cases run on the H100 through the device
tool (they skip here).
"""

from __future__ import annotations

import os
import secrets
import shutil

import numpy as np
import pytest
import torch

from iceaggr_lib.backends import UnsupportedError, available_backends, dom_attention, get_backend
from iceaggr_lib.testing import (DENSE_SCORE_MAX_PULSES, TOLERANCE, batch_from_dom_sizes, random_qkv, realistic_batch,
                                 rel_err)

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False

HAVE_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAVE_CUDA, reason="needs a CUDA GPU (run on the H100 through the device tool)")
OURS = ["loop", "padded", "flex_dense", "flex_dense_eager", "flex_block", "varlen"]
COMPILED = {"flex_dense", "flex_block"}


def fresh_seed() -> int:
    return secrets.randbits(31)


def random_dom_sizes(n_doms: int, rng: np.random.Generator, long_dom: int = 150) -> np.ndarray:
    """Mostly 1-3 pulse DOMs (as in IceCube) plus a few long ones that span several 128-row blocks."""
    sizes = np.minimum(rng.geometric(0.45, n_doms), 455)
    sizes[rng.integers(0, n_doms, 3)] = rng.integers(long_dom // 2, long_dom + 1, 3)
    return sizes


def check_against_reference(name, batch, n_heads, head_dim, dtype, device, mode, seed):
    """Run backend ``name`` and the reference on the same inputs; assert forward (and gradient) errors."""
    get_backend(name).check(device, dtype, mode)
    batch = batch.to(device)
    backward = mode == "forward_backward"
    q, k, v = random_qkv(batch.n_pulses, n_heads, head_dim, dtype=dtype, device=device, seed=seed,
                         requires_grad=backward)
    q64, k64, v64 = (t.detach().double().requires_grad_(backward) for t in (q, k, v))
    out = dom_attention(q, k, v, batch, name, mode=mode)
    ref = dom_attention(q64, k64, v64, batch, "reference", mode=mode)
    tol = TOLERANCE[dtype]
    what = f"backend={name} device={device} dtype={dtype} H={n_heads} Dh={head_dim} seed={seed} {batch}"
    assert out.shape == (batch.n_doms, n_heads, head_dim), what
    assert out.dtype == dtype, what
    err = rel_err(out, ref)
    assert err <= tol, f"forward rel err {err:.3g} > {tol} ({what})"
    if backward:
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1)).to(device)
        grads = torch.autograd.grad(out, (q, k, v), g.to(dtype))
        grads_ref = torch.autograd.grad(ref, (q64, k64, v64), g.double())
        dv_norm = float(torch.linalg.vector_norm(grads_ref[2]))
        for label, a, r in zip(("dq", "dk", "dv"), grads, grads_ref):
            if float(torch.linalg.vector_norm(r)) <= 1e-9 * dv_norm:
                # Exactly zero in exact arithmetic (one-pulse DOMs: softmax over one key is constant):
                # what remains is rounding, measured against the scale of the gradients (dv).
                e = float(torch.linalg.vector_norm(a.detach().double().cpu())) / dv_norm
            else:
                e = rel_err(a, r)
            assert e <= tol, f"{label} rel err {e:.3g} > {tol} ({what})"
    return err


def supported(name, device, dtype, mode) -> bool:
    try:
        get_backend(name).check(device, dtype, mode)
        return True
    except UnsupportedError:
        return False


# ---- CPU cases (CI) --------------------------------------------------------------------------------

CPU_CASES = [(name, dtype, mode, heads)
             for name in ("loop", "padded", "flex_dense_eager")
             for dtype in (torch.float32, torch.bfloat16)
             for mode in ("forward", "forward_backward")
             for heads in (1, 8)
             if supported(name, "cpu", dtype, mode) and not (name == "loop" and dtype == torch.bfloat16)
             and not (name == "flex_dense_eager" and dtype == torch.bfloat16 and heads == 8)]


@pytest.mark.parametrize("name,dtype,mode,heads", CPU_CASES)
def test_cpu_random_batch(name, dtype, mode, heads):
    seed = fresh_seed()
    n_doms = 50 if name == "loop" else 120
    batch = batch_from_dom_sizes(random_dom_sizes(n_doms, np.random.default_rng(seed)), doms_per_event=25, seed=seed)
    check_against_reference(name, batch, heads, 128 // heads, dtype, "cpu", mode, seed)


# Inductor compiles CPU kernels as C++: without a compiler the compiled flex test can only fail, opaquely.
HAVE_CXX = bool(shutil.which(os.environ.get("CXX", "g++")) or shutil.which("clang++"))


# Seen on the H100 image (torch 2.11.0+cu130, 2026-11-24): Inductor's C++ for the CPU flex_attention template does
# not compile ("'cur_qSplitSize8' was not declared in this scope"), a bug of that torch; torch 2.13 (CI) compiles it.
# Not every time: the next GPU run (2026-11-25, another random batch from fresh_seed) compiled and passed it, so
# the failure depends on the shapes; hence an xfail that may pass (strict=False).
TORCH_VERSION = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])


@pytest.mark.skipif(not HAVE_CXX, reason="torch.compile on the CPU needs a C++ compiler (g++ or clang++, or $CXX)")
@pytest.mark.xfail(TORCH_VERSION < (2, 13), strict=False,
                   reason="torch 2.11's Inductor emits CPU flex_attention C++ that does not compile (cur_qSplitSize8)")
def test_cpu_compiled_flex_block_forward():
    """Compiled FlexAttention with our BlockMask on CPU (forward only: no backward there). One small case:
    a cold CPU compile costs ~20 s on 2 cores. Compiled flex_dense is checked on CUDA (and its compile
    path is the same function)."""
    seed = fresh_seed()
    batch = batch_from_dom_sizes(random_dom_sizes(100, np.random.default_rng(seed)), seed=seed)
    with torch.no_grad():
        check_against_reference("flex_block", batch, 8, 16, torch.float32, "cpu", "forward", seed)


@pytest.mark.parametrize("name", ["loop", "padded", "flex_dense_eager"])
def test_cpu_realistic_batch(name):
    n_events = 6 if name == "loop" else 20
    # (flex_dense_eager materialises N x N scores: its batch is bounded, see DENSE_SCORE_MAX_PULSES)
    max_pulses = DENSE_SCORE_MAX_PULSES if name == "flex_dense_eager" else None
    batch, seed = realistic_batch(n_events, fresh_seed(), max_pulses)
    mode = "forward" if name.startswith("flex") else "forward_backward"
    check_against_reference(name, batch, 1, 128, torch.float32, "cpu", mode, seed)


def test_realistic_batch_bound_redraws_and_names_itself():
    """``realistic_batch`` with ``max_pulses`` draws the next seeds until the sample fits, and says so when none
    does."""
    seeds = [s for s in range(40) if realistic_batch(20, s)[0].n_pulses > DENSE_SCORE_MAX_PULSES]
    assert seeds, "no bright 20-event sample in 40 seeds: the bound would test nothing"
    batch, seed = realistic_batch(20, seeds[0], DENSE_SCORE_MAX_PULSES)
    assert batch.n_pulses <= DENSE_SCORE_MAX_PULSES and seed > seeds[0]
    with pytest.raises(ValueError, match="within 1 pulses in 3 seeds"):
        realistic_batch(20, 0, max_pulses=1, tries=3)


EDGE_SIZES = {
    "all_one_pulse": [1] * 300,
    "single_455": [455],
    "mixed_block_edges": [127, 1, 128, 129, 1, 255, 2],
}


@pytest.mark.parametrize("case", sorted(EDGE_SIZES))
@pytest.mark.parametrize("name", ["loop", "padded", "flex_dense_eager"])
def test_cpu_edge_cases(name, case):
    seed = fresh_seed()
    batch = batch_from_dom_sizes(EDGE_SIZES[case], seed=seed)
    mode = "forward" if name.startswith("flex") else "forward_backward"
    check_against_reference(name, batch, 8, 16, torch.float32, "cpu", mode, seed)


@pytest.mark.parametrize("name", ["loop", "padded"])
def test_cpu_one_event(name):
    seed = fresh_seed()
    batch = realistic_batch(1, seed)[0]
    assert batch.n_events == 1
    check_against_reference(name, batch, 1, 128, torch.float32, "cpu", "forward_backward", seed)


@pytest.mark.parametrize("name", ["loop", "padded"])
def test_cpu_fp32_gradient_that_cancels(name):
    """A one-event batch whose only multi-pulse DOM has two pulses: its dq is small (0.26 against a dv of 64)
    and cancels, and torch's CPU flash-attention kernel got it to 3.8e-5 only, above the fp32 tolerance
    (seen in CI); ``backends/sdpa.py`` sends fp32 on the CPU through the math kernel (9.4e-7)."""
    seed = 1567921317
    check_against_reference(name, realistic_batch(1, seed)[0], 1, 128, torch.float32, "cpu",
                            "forward_backward", seed)


def test_cpu_more_than_65535_doms():
    """Padded handles > 65,535 DOMs on CPU (cheap: short DOMs, small head dim)."""
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    sizes = np.minimum(rng.geometric(0.8, 70_000), 4)
    batch = batch_from_dom_sizes(sizes, doms_per_event=50, seed=seed)
    check_against_reference("padded", batch, 1, 16, torch.float32, "cpu", "forward_backward", seed)


# ---- contract: declared support and clear refusals --------------------------------------------------

def test_registry_lists_every_backend():
    for name in OURS + ["reference"]:
        assert name in available_backends()
        spec = get_backend(name)
        assert spec.name == name and spec.description and spec.devices and spec.dtypes and spec.modes


@pytest.mark.parametrize("name,device,dtype,mode,fragment", [
    ("varlen", "cpu", torch.bfloat16, "forward", "does not run on cpu"),
    ("varlen", "cuda", torch.float32, "forward", "does not support float32"),
    ("flex_dense", "cpu", torch.float32, "forward_backward", "FlexAttention does not support backward on CPU"),
    ("flex_dense_eager", "cpu", torch.float32, "forward_backward", "does not support backward on CPU"),
    ("flex_block", "cpu", torch.float32, "forward_backward", "does not support backward on CPU"),
    ("flex_block", "cpu", torch.float64, "forward", "does not support float64"),
])
def test_unsupported_combination_names_backend(name, device, dtype, mode, fragment):
    with pytest.raises(UnsupportedError, match=f"'{name}'") as info:
        get_backend(name).check(device, dtype, mode)
    assert fragment in str(info.value)


def test_dom_attention_refuses_before_running():
    """dom_attention checks the combination itself: varlen on CPU, flex backward on CPU."""
    batch = batch_from_dom_sizes([3, 1, 2])
    q, k, v = random_qkv(batch.n_pulses, 1, 16, dtype=torch.bfloat16)
    with pytest.raises(UnsupportedError, match="'varlen' does not run on cpu"):
        dom_attention(q, k, v, batch, "varlen")
    q, k, v = random_qkv(batch.n_pulses, 1, 16, requires_grad=True)
    with pytest.raises(UnsupportedError, match="'flex_block': FlexAttention does not support backward on CPU"):
        dom_attention(q, k, v, batch, "flex_block", mode="forward_backward")


def test_unknown_backend_lists_known_names():
    with pytest.raises(KeyError, match="padded"):
        get_backend("no_such_backend")


def test_varlen_chunk_plan_covers_all_doms():
    """The chunk plan of varlen (testable without a GPU): <= max_doms DOMs per chunk, rebased cu_seqlens."""
    from iceaggr_lib.backends.varlen import chunk_plan
    rng = np.random.default_rng(fresh_seed())
    batch = batch_from_dom_sizes(rng.integers(1, 9, 1000))
    plan = chunk_plan(batch.cu_seqlens, batch.dom_pulse_counts, max_doms=96)
    assert len(plan) == -(-1000 // 96)
    rows, doms = 0, 0
    for r0, r1, cu, max_len in plan:
        assert r0 == rows and int(cu[0]) == 0 and int(cu[-1]) == r1 - r0 and cu.dtype == torch.int32
        n = len(cu) - 1
        assert 1 <= n <= 96
        assert max_len == int(batch.dom_pulse_counts[doms:doms + n].max())
        rows, doms = r1, doms + n
    assert rows == batch.n_pulses and doms == batch.n_doms


# ---- CUDA cases (H100 through the device tool) ------------------------------------------------------

CUDA_CASES = [(name, dtype, mode, heads)
              for name in OURS
              for dtype in (torch.float32, torch.bfloat16, torch.float16)
              for mode in ("forward", "forward_backward")
              for heads in (1, 8)
              if supported(name, "cuda", dtype, mode) and not (name == "loop" and dtype != torch.float32)
              and not (dtype == torch.float16 and name != "varlen")
              # compiled flex: each (dtype, grad mode, heads) is a compile of ~10-30 s; keep the ones the
              # other tests and the benchmark use (fp32 fwd+bwd H=1/8, bf16 fwd+bwd H=1, bf16 fwd H=1)
              and not (name in COMPILED and (dtype, mode, heads) not in {
                  (torch.float32, "forward_backward", 1), (torch.float32, "forward_backward", 8),
                  (torch.bfloat16, "forward_backward", 1), (torch.bfloat16, "forward", 1)})]


@needs_cuda
@pytest.mark.parametrize("name,dtype,mode,heads", CUDA_CASES)
def test_cuda_random_batch(name, dtype, mode, heads):
    seed = fresh_seed()
    n_doms = 150 if name == "loop" else 3000
    batch = batch_from_dom_sizes(random_dom_sizes(n_doms, np.random.default_rng(seed), long_dom=455),
                                 doms_per_event=60, seed=seed)
    check_against_reference(name, batch, heads, 128 // heads, dtype, "cuda", mode, seed)


@needs_cuda
@pytest.mark.parametrize("name", [n for n in OURS if n != "loop"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_realistic_batch(name, dtype):
    if name == "varlen" and dtype == torch.float32:
        pytest.skip("varlen is fp16/bf16 only (refusal tested above)")
    seed = fresh_seed()
    # dense flex is O(N^2) in memory: 256 events (~30k pulses) asked 16 GiB for bf16 backward on an H100 (OOM)
    n_events = 64 if name.startswith("flex_dense") else 256
    batch = realistic_batch(n_events, seed)[0]
    check_against_reference(name, batch, 1, 128, dtype, "cuda", "forward_backward", seed)


@needs_cuda
@pytest.mark.parametrize("case", sorted(EDGE_SIZES))
@pytest.mark.parametrize("name", [n for n in OURS if n != "loop"])
def test_cuda_edge_cases(name, case):
    seed = fresh_seed()
    dtype = torch.bfloat16 if name == "varlen" else torch.float32
    batch = batch_from_dom_sizes(EDGE_SIZES[case], seed=seed)
    check_against_reference(name, batch, 8, 16, dtype, "cuda", "forward_backward", seed)


@needs_cuda
@pytest.mark.parametrize("name", ["varlen", "flex_block", "flex_dense"])
def test_cuda_4096_events_more_than_65535_doms(name):
    """A realistic 4,096-event batch (~450k pulses, ~200k DOMs > 65,535): varlen must chunk its calls."""
    seed = fresh_seed()
    batch = realistic_batch(4096, seed)[0]
    assert batch.n_doms > 65_535
    mode = "forward" if name == "flex_dense" else "forward_backward"  # dense flex is O(N^2): forward only
    check_against_reference(name, batch, 1, 128, torch.bfloat16, "cuda", mode, seed)


def test_reference_errors_pass_a_correct_backend_and_catch_a_wrong_one():
    """testing.reference_errors (shared by the dom_fused tests and the GPU scripts): small for padded,
    large for an attention that forgets the softmax (plain mean of v)."""
    from iceaggr_lib.testing import reference_errors

    batch = batch_from_dom_sizes([1, 3, 2, 7, 1], seed=4)
    q, k, v = random_qkv(batch.n_pulses, 2, 8, seed=4, requires_grad=True)
    grad = torch.randn(batch.n_doms, 2, 8, generator=torch.Generator().manual_seed(5))
    padded = get_backend("padded")
    good = reference_errors(lambda q, k, v: padded.attend(q, k, v, batch, padded.prepare(batch, 2, 8, q.dtype), 8 ** -0.5),
                            batch, q, k, v, grad, 8 ** -0.5)
    assert len(good) == 4 and max(good) <= 1e-5
    counts = batch.dom_pulse_counts.to(q.dtype)[:, None, None]

    def mean_v(q, k, v):  # ignores q and k: wrong whenever a DOM has more than one pulse
        summed = torch.zeros(batch.n_doms, 2, 8).index_add(0, batch.pulse_to_dom_idx, v + 0 * (q + k))
        return summed / counts

    bad = reference_errors(mean_v, batch, q, k, v, grad, 8 ** -0.5)
    assert bad[0] > 1e-3 and bad[1] > 0.5
