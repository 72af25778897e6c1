"""The beam-step cubins launched on a GPU through the plugin's own launch path,
against the numpy reference (skips where there is no GPU)."""

from __future__ import annotations

import numpy as np
import pytest

from fastertrt.plugins.beam_search.reference import beam_step_numpy


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("beams", [1, 4])
def test_launch_on_gpu_matches_reference(dtype, beams):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA here")
    from fastertrt.plugins.beam_search.kernels import compile_kernels
    from fastertrt.plugins.beam_search.launch import beam_step_launch, workspace_bytes
    from fastertrt.plugins.cuda_launch import current_compute_capability, unpack_kernels

    torch.cuda.init()
    cc = current_compute_capability()
    kernels = {name: unpack_kernels(blob) for name, blob in compile_kernels(dtype, True, [cc]).items()}
    batch, vocab, candidates = 3, 5003, 2
    k = candidates * beams
    rng = np.random.default_rng(beams)
    logits = (rng.normal(size=(batch * beams, vocab)) * 4).astype(dtype)
    scores = -3 * rng.random((batch, beams), dtype=np.float32)
    bias = np.zeros(vocab, np.float32)
    bias[[2, 17]] = -np.inf
    dev = {n: torch.from_numpy(a).cuda() for n, a in (("logits", logits), ("scores", scores), ("bias", bias))}
    out_s = torch.empty(batch, k, dtype=torch.float32, device="cuda")
    out_t = torch.empty(batch, k, dtype=torch.int32, device="cuda")
    out_b = torch.empty(batch, k, dtype=torch.int32, device="cuda")
    ws = torch.empty(workspace_bytes(batch * beams, vocab, k), dtype=torch.uint8, device="cuda")
    beam_step_launch(kernels, cc, logits=dev["logits"].data_ptr(), logits_dtype=dtype,
                     beam_scores=dev["scores"].data_ptr(), bias=dev["bias"].data_ptr(), scores=out_s.data_ptr(),
                     tokens=out_t.data_ptr(), beams=out_b.data_ptr(), workspace=ws.data_ptr(), batch=batch,
                     num_beams=beams, vocab=vocab, k=k, stream=torch.cuda.current_stream().cuda_stream)
    torch.cuda.synchronize()
    want = beam_step_numpy(logits.astype(np.float32), scores, bias, candidates)
    np.testing.assert_allclose(out_s.cpu().numpy(), want[0], atol=1e-5, rtol=0)
    np.testing.assert_array_equal(out_t.cpu().numpy(), want[1])
    np.testing.assert_array_equal(out_b.cpu().numpy(), want[2])
