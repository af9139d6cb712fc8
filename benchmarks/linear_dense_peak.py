"""Peak memory and time of ``linear_cb_loss`` with dense (mixup) targets against the materialised logits.

Run from the repository root: ``PYTHONPATH=. python benchmarks/linear_dense_peak.py``. N=2048, H=1024, V=32768,
float32, softmax, forward+backward, 2 threads; results kept in benchmarks/results/linear_loss_dense_cpu_fp32.json.
"""

import json
import time

import torch

import cbkernels as cb
from benchmarks import harness

N, H, V = 2048, 1024, 32768


def main() -> dict:
    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(N, H, generator=g).requires_grad_()
    lm = (torch.randn(V, H, generator=g) * 0.02).requires_grad_()
    lam = torch.rand(N, 1, generator=g)
    a = torch.randint(0, V, (N,), generator=g)
    b = torch.randint(0, V, (N,), generator=g)
    q = torch.zeros(N, V).scatter_(1, a[:, None], lam).scatter_add_(1, b[:, None], 1 - lam)
    w = torch.rand(V, generator=g) + 0.5

    def fused():
        cb.linear_cb_loss(h, lm, q, weight=w, loss_type="softmax", backend="cpu").backward()

    def materialised():
        cb.class_balanced_loss(h @ lm.T, q, weight=w, loss_type="softmax", backend="cpu").backward()

    def naive():
        row_w = (q @ w) / q.sum(1)
        (row_w * torch.sum(-q * torch.log_softmax(h @ lm.T, -1), -1)).mean().backward()

    out = {}
    for name, fn in (("linear_cb_loss", fused), ("materialised cb", materialised), ("materialised naive", naive)):
        h.grad = lm.grad = None
        fn()  # warm-up
        h.grad = lm.grad = None
        peak = harness.cpu_peak_bytes(fn)
        h.grad = lm.grad = None
        t0 = time.perf_counter()
        fn()
        out[name] = {"peak_MiB": peak / 2**20, "s": time.perf_counter() - t0}
        print(f"{name:20s} peak {peak / 2**20:6.0f} MiB  time {out[name]['s']:.3f} s", flush=True)
    return out


if __name__ == "__main__":
    print(json.dumps(main()))
