"""fused_projection.fused_qkv (both input projections in one Triton launch) against the eager layers.

Runs on CUDA, or on a CPU machine through Triton's interpreter (triton installed, TRITON_INTERPRET=1); skipped
otherwise (the CI venv has no triton). bf16 on CUDA only, as in test_dom_fused.py.
"""

import pytest
import torch

from iceaggr_lib import fused_projection
from iceaggr_lib.model import DOMAggregator
from iceaggr_lib.testing import TOLERANCE, rel_err, triton_kernel_device

DEVICE = triton_kernel_device()

needs_kernel = pytest.mark.skipif(DEVICE is None, reason="needs CUDA, or triton with TRITON_INTERPRET=1")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=needs_cuda)])
@pytest.mark.parametrize("n,d_model,precision", [(1030, 128, "tf32x3_mask"), (33, 64, "tf32x3_mask"),
                                                 (1, 128, "tf32x3_mask"), (1030, 128, "ieee")])
def test_fused_qkv_matches_the_eager_layers(dtype, n, d_model, precision):
    """Every row and column against ``qkv(embed(x))`` in float64 on the same (rounded) weights; n not a multiple
    of the program's rows, so the last program's masked rows are exercised. Features of a realistic spread
    (x100) make a tf32 pass's error (~1e-3) visible, which the fp32 tolerance (1e-5) refuses."""
    torch.manual_seed(n)
    model = DOMAggregator(d_model=d_model, n_heads=1).to(DEVICE, dtype)
    x = torch.randn(n, model.pulse_embed.in_features, device=DEVICE) * 100
    out = fused_projection.fused_qkv(x, model.pulse_embed, model.qkv_proj, precision)
    e, q = model.pulse_embed, model.qkv_proj
    h = x.to(dtype).double() @ e.weight.double().T + e.bias.double()
    if dtype == torch.bfloat16:  # the eager layers round the embedding to bf16 between the products
        h = h.to(dtype).double()
    ref = h @ q.weight.double().T + q.bias.double()
    assert out.shape == (n, 3 * d_model) and out.dtype == dtype
    assert rel_err(out, ref) <= TOLERANCE[dtype]
    with torch.no_grad():
        eager = q(e(x.to(dtype)))
    assert rel_err(out, eager) <= TOLERANCE[dtype]


@needs_kernel
def test_fused_qkv_refuses_what_it_cannot_do():
    model = DOMAggregator(d_model=128).to(DEVICE)
    x = torch.randn(10, model.pulse_embed.in_features + 1, device=DEVICE)
    with pytest.raises(ValueError, match="features"):
        fused_projection.fused_qkv(x, model.pulse_embed, model.qkv_proj)
    odd = DOMAggregator(d_model=96, n_heads=1).to(DEVICE)  # not a power of two
    assert not fused_projection.supports(odd.pulse_embed, odd.qkv_proj)
    with pytest.raises(ValueError, match="not supported"):
        fused_projection.fused_qkv(x[:, :-1], odd.pulse_embed, odd.qkv_proj)
    assert fused_projection.fused_qkv(x[:0, :-1], model.pulse_embed, model.qkv_proj).shape == (0, 384)
    with pytest.raises(ValueError, match="precision"):
        fused_projection.fused_qkv(x[:, :-1], model.pulse_embed, model.qkv_proj, "tf32")
