"""dom_graphs: dom_fused's training step and inference forward replayed from CUDA graphs that serve any batch of
their bucket.

The indirect launches (tensors and N read from an argument buffer, the grid a larger bucket's) run through
Triton's interpreter on CPU (TRITON_INTERPRET=1) and on CUDA; the graph capture and replay need CUDA. Each case
compares with the float64 reference and with the eager launches on fresh random inputs.
"""

import pytest
import torch

from iceaggr_lib.backends import dom_fused, dom_graphs
from iceaggr_lib.testing import (TOLERANCE, batch_from_dom_sizes, icecube_like_sizes, random_qkv, reference_errors,
                                 triton_kernel_device)

DEVICE = triton_kernel_device()
needs_kernel = pytest.mark.skipif(DEVICE is None, reason="needs CUDA, or triton with TRITON_INTERPRET=1")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

SIZES = [1, 1, 2, 3, 1, 20, 1, 1, 37, 1, 1, 3, 16, 17, 1, 70, 1, 2, 9]  # tiles of both levels and large DOMs


def _args(values):
    return torch.tensor(values, dtype=torch.int64, device=DEVICE)


@needs_kernel
@pytest.mark.parametrize("n_heads,config", [(1, dict(levels=(8, 16), bwd_levels=(8,), block=16, merged=False, size_classes=0)),
                                            (1, dict(levels=(8, 16), bwd_levels=(8,), block=16, merged=True)),
                                            (2, dict(levels=(8,), bwd_levels=(8,), block=16))],
                         ids=["two_launches", "merged", "single_level_2heads"])
def test_indirect_launches_match_direct_ones(n_heads, config):
    """The kernels given their tensors and N through the argument buffer, on a grid for 3x the rows (the
    programs past N must find no work and write nothing), give the direct launches' results bit for bit."""
    batch = batch_from_dom_sizes(SIZES, seed=1).to(DEVICE)
    n, d, dh = batch.n_pulses, batch.n_doms, 16
    q, k, v = random_qkv(n, n_heads, dh, dtype=torch.float32, device=DEVICE, seed=2)
    g = torch.randn((d, n_heads, dh), device=DEVICE)
    idx = (batch.cu_seqlens, batch.pulse_to_dom_idx, batch.dom_pulse_counts)
    scale = dh ** -0.5
    out_ref = dom_fused._forward(q, k, v, *idx, scale, True, False, dict(config))[0]
    grads_ref = dom_fused.fused_backward(g, q, k, v, *idx, scale, **config)

    out = torch.full_like(out_ref, float("nan"))  # an unwritten row fails
    values = [q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), out.data_ptr(), batch.pulse_to_dom_idx.data_ptr(),
              batch.cu_seqlens.data_ptr(), batch.dom_pulse_counts.data_ptr(), n, 0, 0, 0, 0]
    dom_fused._forward(q, k, v, *idx, scale, True, False, dict(config), out=out, saved=out,
                       indirect=(_args(values), 3 * n))
    assert torch.equal(out, out_ref)

    grads = torch.full((3, n, n_heads, dh), float("nan"), device=DEVICE).unbind(0)
    scratch = torch.empty((3 * n, n_heads, 2), device=DEVICE)
    values[3:5] = [0, scratch.data_ptr()]
    values[9:] = [g.data_ptr(), *(t.data_ptr() for t in grads)]
    dom_fused.fused_backward(g, q, k, v, *idx, scale, grads=grads, scratch=scratch, indirect=(_args(values), 3 * n),
                             **config)
    for got, want in zip(grads, grads_ref):
        assert torch.equal(got, want)


class _ReplayedClosure:
    """A stand-in for a captured CUDA graph: replaying re-runs the captured launches as they were captured, with the
    first call's tensors as their arguments, which the INDIRECT kernels ignore for the buffer's, as a graph's do."""

    def __init__(self, fn):
        self.fn = fn

    def replay(self):
        self.fn()


@needs_kernel
def test_graph_protocol_serves_later_batches(monkeypatch):
    """dom_graphs' whole call protocol (keys, mailbox, fetch kernel, ack, scratch slot, indirect launches), with
    graph capture replaced by re-running the captured closure: three training steps whose batches share a bucket,
    each equal to the eager launches bit for bit; one entry per direction. On CUDA the same runs with real graphs
    (below); here it also runs through Triton's interpreter."""
    dom_graphs.clear()
    monkeypatch.setattr(dom_graphs, "_capture", _ReplayedClosure)
    monkeypatch.setattr(dom_graphs, "_applies", lambda q: True)
    monkeypatch.setattr(dom_graphs, "MIN_BUCKET", 64)  # (a small grid for the interpreter)
    config = dict(levels=(8, 16), bwd_levels=(8,), block=16)
    scale = 16 ** -0.5
    for seed, sizes in enumerate([SIZES, SIZES[::-1], SIZES[3:] + [5, 1, 1]]):
        batch = batch_from_dom_sizes(sizes, seed=seed).to(DEVICE)
        q, k, v = random_qkv(batch.n_pulses, 2, 16, dtype=torch.float32, device=DEVICE, seed=seed)
        g = torch.randn((batch.n_doms, 2, 16), device=DEVICE)
        for got, want in zip(_step(batch, q, k, v, g, scale, **config),
                             _step(batch, q, k, v, g, scale, graphs=False, **config)):
            assert torch.equal(got, want)
        assert torch.equal(_infer(batch, q, k, v, scale, **config), _infer(batch, q, k, v, scale, graphs=False, **config))
    entries = {key[0]: e for key, e in dom_graphs._ENTRIES.items() if e is not None}
    assert sorted(entries) == ["bwd", "fwd", "inf"]
    assert all(e.seq == 3 and e.ack_np[dom_graphs.SEQ_SLOT] == 3 for e in entries.values())
    dom_graphs.clear()


def test_bucket_for_min_bucket_and_steps():
    assert dom_graphs.bucket_for(10, dom_graphs.MIN_BUCKET, 4) == 4096
    assert dom_graphs.bucket_for(117_902, dom_graphs.MIN_BUCKET, 4) == 131_072
    assert dom_graphs.bucket_for(131_140, dom_graphs.MIN_BUCKET, 4) == 163_840
    with pytest.raises(ValueError, match="steps_per_octave"):
        dom_graphs.bucket_for(10, 1, 3)


def test_graphs_setting_is_checked():
    q = torch.zeros(4, 1, 16)
    with pytest.raises(ValueError, match="graphs must be True, False or 'auto'"):
        dom_fused._graphs_setting(dict(graphs="yes"), q)
    with pytest.raises(ValueError, match="graphs=True needs CUDA"):
        dom_fused._graphs_setting(dict(graphs=True), q)
    assert dom_fused._graphs_setting({}, q) == "auto"
    # "auto": graphs below the measured pulse counts (training / inference), True at any size, False never
    one, multi = dom_fused.INFERENCE_GRAPHS_BELOW_PULSES, dom_fused.INFERENCE_GRAPHS_BELOW_PULSES_MULTI_HEAD
    assert multi < one  # one head's forward is host-bound to larger sizes
    for n, heads, autograd, want in [(dom_fused.TRAINING_GRAPHS_BELOW_PULSES - 1, 1, True, True),
                                     (dom_fused.TRAINING_GRAPHS_BELOW_PULSES - 1, 8, True, True),
                                     (dom_fused.TRAINING_GRAPHS_BELOW_PULSES, 1, True, False),
                                     (one - 1, 1, False, True), (one, 1, False, False),
                                     (multi - 1, 8, False, True), (multi, 8, False, False),
                                     (multi, 1, False, True)]:
        big = torch.zeros(1, heads, 16).expand(n, heads, 16)
        assert dom_fused._use_graphs({}, big, autograd) is want, (n, heads, autograd)
        assert dom_fused._use_graphs(dict(graphs=False), big, autograd) is False
    # several heads from merge_below_pulses: size classes, which graphs do not replay
    assert dom_fused._graph_config(torch.zeros(4, 8, 16), {}, 1 << 20) is None
    with pytest.raises(ValueError, match="size classes"):
        dom_fused._graph_config(torch.zeros(4, 8, 16), dict(graphs=True), 1 << 20)
    assert dom_fused._graph_config(torch.zeros(4, 1, 128, dtype=torch.bfloat16), {}, 1 << 20)["concurrent"] is True
    # one fp32 head: a training step keeps the merged launch (graphed); inference from merge_below_pulses has size
    # classes (eager)
    q32 = torch.zeros(4, 1, 128)
    assert dom_fused._graph_config(q32, {}, 1 << 20)["merged"] is True
    assert dom_fused._graph_config(q32, {}, 1 << 20, autograd=False) is None
    assert dom_fused._graph_config(q32, {}, 1 << 16, autograd=False) is not None


def _infer(batch, q, k, v, scale, **config):
    with torch.no_grad():
        return dom_fused.dom_fused_attention(q, k, v, batch.cu_seqlens, batch.pulse_to_dom_idx, batch.dom_pulse_counts,
                                             scale, **config)


def _step(batch, q, k, v, g, scale, **config):
    q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
    out = dom_fused.dom_fused_attention(q, k, v, batch.cu_seqlens, batch.pulse_to_dom_idx, batch.dom_pulse_counts,
                                        scale, **config)
    return [out.detach(), *torch.autograd.grad(out, (q, k, v), g)]


def _batch_with_455(n_doms, sizes_seed, at, n_heads, head_dim, dtype, seed, buckets):
    """A CUDA IceCube-like batch of ``n_doms`` DOMs with a 455-pulse DOM at index ``at``, and random q, k, v; adds
    its pulse bucket to ``buckets``."""
    sizes = icecube_like_sizes(n_doms, seed=sizes_seed)
    sizes[at] = 455
    batch = batch_from_dom_sizes(sizes, seed=seed).to("cuda")
    buckets.add(dom_graphs.bucket_for(batch.n_pulses, dom_graphs.MIN_BUCKET, dom_graphs.STEPS_PER_OCTAVE))
    return (batch, *random_qkv(batch.n_pulses, n_heads, head_dim, dtype=dtype, device="cuda", seed=seed))


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n_heads,head_dim", [(1, 128), (8, 16)])
def test_graphed_training_steps_match_eager_and_reference(dtype, n_heads, head_dim):
    """Batches of different sizes, each with a 455-pulse DOM: the first call of a bucket captures, the next
    replays the same graph; every result equals the eager
    launches' (same kernels, same arithmetic) and is within tolerance of the float64 reference."""
    dom_graphs.clear()
    scale = head_dim ** -0.5
    before, buckets = dom_graphs.captures, set()
    for i, n_doms in enumerate([3000, 3050, 9000]):
        batch, q, k, v = _batch_with_455(n_doms, 10 + i, n_doms // 2, n_heads, head_dim, dtype, i, buckets)
        g = torch.randn((batch.n_doms, n_heads, head_dim), device="cuda").to(dtype)
        eager = _step(batch, q, k, v, g, scale, graphs=False)
        graphed = _step(batch, q, k, v, g, scale)
        again = _step(batch, q, k, v, g, scale)  # a replay of the graph just captured
        for a, b, c in zip(eager, graphed, again):
            assert torch.equal(a, b) and torch.equal(a, c)

        def attend(q, k, v):
            return dom_fused.dom_fused_attention(q, k, v, batch.cu_seqlens, batch.pulse_to_dom_idx,
                                                 batch.dom_pulse_counts, scale)

        q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
        errs = reference_errors(attend, batch, q, k, v, g, scale)
        assert max(errs) <= TOLERANCE[dtype], errs
    assert dom_graphs.captures - before == 2 * len(buckets)  # a forward and a backward graph per bucket


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n_heads,head_dim", [(1, 128), (8, 16)])
def test_graphed_inference_matches_eager_and_reference(dtype, n_heads, head_dim):
    """An inference forward (no autograd) replays graphs of its own, one per bucket: each batch's output equals the
    eager launches' bit for bit, on the capture and on a replay, and is within tolerance of the float64 reference;
    an output of an earlier call stays valid after later ones."""
    from iceaggr_lib.backends import get_backend
    from iceaggr_lib.testing import rel_err

    dom_graphs.clear()
    scale = head_dim ** -0.5
    before, buckets, kept = dom_graphs.captures, set(), []
    ref = get_backend("reference")
    for i, n_doms in enumerate([3000, 3050, 9000]):
        batch, q, k, v = _batch_with_455(n_doms, 20 + i, n_doms // 3, n_heads, head_dim, dtype, i, buckets)
        eager = _infer(batch, q, k, v, scale, graphs=False)
        graphed, again = _infer(batch, q, k, v, scale), _infer(batch, q, k, v, scale)
        assert torch.equal(eager, graphed) and torch.equal(eager, again)
        kept.append((graphed, eager))
        with torch.no_grad():
            want = ref.attend(q.double(), k.double(), v.double(), batch,
                              ref.prepare(batch, n_heads, head_dim, torch.float64), scale)
        assert rel_err(graphed, want) <= TOLERANCE[dtype]
    assert all(torch.equal(a, b) for a, b in kept)
    assert dom_graphs.captures - before == len(buckets)


@needs_cuda
def test_inference_graphs_only_below_their_threshold(monkeypatch):
    """Under "auto" an inference forward from INFERENCE_GRAPHS_BELOW_PULSES pulses launches eagerly (no capture);
    graphs=True replays at any size; both give the eager result."""
    dom_graphs.clear()
    batch = batch_from_dom_sizes(icecube_like_sizes(800, seed=4), seed=4).to("cuda")
    q, k, v = random_qkv(batch.n_pulses, 1, 128, dtype=torch.bfloat16, device="cuda", seed=4)
    monkeypatch.setattr(dom_fused, "INFERENCE_GRAPHS_BELOW_PULSES", batch.n_pulses)
    eager = _infer(batch, q, k, v, 128 ** -0.5, graphs=False)
    before = dom_graphs.captures
    assert torch.equal(_infer(batch, q, k, v, 128 ** -0.5), eager) and dom_graphs.captures == before
    assert torch.equal(_infer(batch, q, k, v, 128 ** -0.5, graphs=True), eager) and dom_graphs.captures == before + 1


@needs_cuda
def test_outputs_of_earlier_steps_stay_valid():
    """Two forwards of one bucket before one backward (gradient accumulation): the first output and both
    gradients are what two eager steps give, since outputs are allocated per call, not graph memory."""
    dom_graphs.clear()
    scale = 128 ** -0.5
    batches = [batch_from_dom_sizes(icecube_like_sizes(2000, seed=s), seed=s).to("cuda") for s in (1, 2)]
    ins = [random_qkv(b.n_pulses, 1, 128, dtype=torch.bfloat16, device="cuda", seed=s, requires_grad=True)
           for s, b in enumerate(batches)]
    results = {}
    for graphs in (False, "auto"):
        outs = [dom_fused.dom_fused_attention(q, k, v, b.cu_seqlens, b.pulse_to_dom_idx, b.dom_pulse_counts,
                                              scale, graphs=graphs) for b, (q, k, v) in zip(batches, ins)]
        first = outs[0].detach().clone()
        loss = sum((o.float() ** 2).sum() for o in outs)
        grads = torch.autograd.grad(loss, [t for qkv in ins for t in qkv])
        results[graphs] = [first, *grads]
    for a, b in zip(results[False], results["auto"]):
        assert torch.equal(a, b)


@needs_cuda
def test_unaligned_inputs_launch_eagerly():
    """q at an address that is not 16-byte aligned cannot use the graphs' alignment assumption: the call takes
    the eager launches, with correct results."""
    dom_graphs.clear()
    batch = batch_from_dom_sizes(icecube_like_sizes(500, seed=3), seed=3).to("cuda")
    n = batch.n_pulses
    flat = torch.randn(n * 128 + 1, device="cuda", dtype=torch.bfloat16)
    q = flat[1:].view(n, 1, 128)  # 2 bytes past an aligned address
    k, v = (torch.randn(n, 1, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    g = torch.randn((batch.n_doms, 1, 128), device="cuda", dtype=torch.bfloat16)
    before = dom_graphs.captures
    got = _step(batch, q, k, v, g, 128 ** -0.5)
    assert dom_graphs.captures == before
    want = _step(batch, q.contiguous(), k, v, g, 128 ** -0.5, graphs=False)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
