"""Fused Triton kernels vs the eager torch composition, at the paper's shapes.

    python benchmarks/kernel_bench.py [--dtype bfloat16|float32] [--json results.json]

B=128, C=2048, layer 4 at 14x14 (BYOL, no stem max-pool) and 7x7 (MoCo), detector K=32 channels,
queue K=65536, dim 256. Times come from triton.testing.do_bench (median ms); GB/s counts the bytes
the fused kernel must at least move (inputs read, outputs written); peak is the extra CUDA memory
one call allocates on top of its inputs.
"""
import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

B, C, K_DET, DIM, QUEUE = 128, 2048, 32, 256, 65536


def _nbytes(*ts: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


def _cases(dtype: torch.dtype, dev: str):
    import lcr_fast.kernels as K

    def rand(*shape, grad=False, scale=1.0, act=lambda x: x):
        return act(torch.randn(shape, device=dev) * scale).to(dtype).requires_grad_(grad)

    for name, hw in (("byol", 14), ("moco", 7)):
        feat, grad = rand(B, C, hw, hw, grad=True), rand(B, C, hw, hw, scale=1e-3)
        yield f"gradcam/{name}", K.gradcam, K.gradcam_torch, (feat, grad), (feat,), _nbytes(feat, grad) * 3 // 2
    y = rand(B, K_DET, 14, 14, grad=True)
    yield "rationale_map/byol", K.rationale_map, K.rationale_map_torch, (y,), (y,), _nbytes(y)
    for name, hw, t, flat in (("byol", 14, 0.4, True), ("moco", 7, 1.0, False)):
        cam, att = rand(B, hw, hw, grad=True, act=torch.relu), rand(B, hw, hw, grad=True, act=torch.sigmoid)
        yield (f"rationale_kl/{name}", lambda c, a, t=t, f=flat: K.rationale_kl(c, a, t, f),
               lambda c, a, t=t, f=flat: K.rationale_kl_torch(c, a, t, f), (cam, att), (cam, att), _nbytes(cam, att))
    q = F.normalize(rand(B, DIM).float(), dim=1).to(dtype).requires_grad_(True)
    k = F.normalize(rand(B, DIM).float(), dim=1).to(dtype)
    queue = F.normalize(torch.randn(DIM, QUEUE, device=dev), dim=0).to(dtype)
    yield ("infonce_queue/moco", lambda a, b, c: K.infonce_queue(a, b, c, 0.2),
           lambda a, b, c: K.infonce_queue_torch(a, b, c, 0.2), (q, k, queue), (q,), _nbytes(q, k, queue))
    p1, z2, p2, z1 = rand(B, DIM, grad=True), rand(B, DIM), rand(B, DIM, grad=True), rand(B, DIM)
    yield "byol_loss/byol", K.byol_loss, K.byol_loss_torch, (p1, z2, p2, z1), (p1, p2), _nbytes(p1, z2, p2, z1)
    feat, att = rand(B, C, 14, 14, grad=True), rand(B, 14, 14, grad=True, act=torch.sigmoid)
    yield "rationale_pool/byol", K.rationale_pool, K.rationale_pool_torch, (feat, att), (feat, att), _nbytes(feat, att)


def _ema_case(dev: str):
    """ResNet-50 + projector parameter list: foreach (ours) vs the reference's per-tensor loop."""
    import lcr_fast.kernels as K

    try:
        import torchvision

        shapes = [p.shape for p in torchvision.models.resnet50().parameters()]
    except ImportError:
        shapes = [(2048, 2048)] * 6 + [(2048,)] * 100
    shapes += [(4096, 2048), (4096,), (4096,), (4096,), (256, 4096), (256,)]
    targets = [torch.randn(s, device=dev) for s in shapes]
    sources = [torch.randn(s, device=dev) for s in shapes]

    def eager():
        for t, s in zip(targets, sources):
            t.copy_(0.996 * t + (1 - 0.996) * s)

    return lambda: K.ema_update(targets, sources, 0.996), eager, 3 * _nbytes(*targets)


def _peak_mb(fn) -> float:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def _modes(fn, args, wrt):
    def fwd():
        with torch.no_grad():
            return fn(*args)

    out = fn(*args)
    up = torch.randn_like(out)

    def bwd():
        return torch.autograd.grad(out, wrt, up, retain_graph=True)

    def both():
        return torch.autograd.grad(fn(*args), wrt, up)

    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": both}


def build_parser() -> argparse.ArgumentParser:
    """The options, unparsed: tests/test_docs.py checks the documentation's commands against them."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")
    ap.add_argument("--rep", type=int, default=50, help="do_bench repetition time in ms")
    return ap


def main() -> int:
    args = build_parser().parse_args()
    if not torch.cuda.is_available():
        print("kernel_bench needs a CUDA GPU; none found, nothing to measure.")
        return 0
    from triton.testing import do_bench

    from lcr_fast.kernels import BACKEND

    dtype, dev = getattr(torch, args.dtype), "cuda"
    rows = []
    header = (f"{'op/shape':24s} {'mode':8s} {'eager ms':>9s} {'fused ms':>9s} {'speedup':>8s} {'GB/s':>7s} "
              f"{'eager MB':>9s} {'fused MB':>9s}")
    print(f"{torch.cuda.get_device_name()}  dtype={args.dtype}\n{header}\n{'-' * len(header)}")

    def record(name, mode, fused, eager, nbytes):
        """nbytes: what the fused kernel must move in this mode (inputs read, outputs written)."""
        t_e, t_f = do_bench(eager, rep=args.rep), do_bench(fused, rep=args.rep)
        row = dict(op=name, mode=mode, dtype=args.dtype, eager_ms=t_e, fused_ms=t_f, speedup=t_e / t_f,
                   fused_gbps=nbytes / t_f / 1e6, eager_peak_mb=_peak_mb(eager), fused_peak_mb=_peak_mb(fused))
        rows.append(row)
        print(f"{name:24s} {mode:8s} {t_e:9.4f} {t_f:9.4f} {row['speedup']:7.2f}x {row['fused_gbps']:7.0f} "
              f"{row['eager_peak_mb']:9.1f} {row['fused_peak_mb']:9.1f}", flush=True)

    with BACKEND.using("triton"):  # the fused kernels, whatever LCR_KERNELS says
        for name, fused_fn, eager_fn, inputs, wrt, nbytes in _cases(dtype, dev):
            fused, eager = _modes(fused_fn, inputs, wrt), _modes(eager_fn, inputs, wrt)
            moved = {"fwd": nbytes, "bwd": nbytes + _nbytes(*wrt)}
            moved["fwd+bwd"] = moved["fwd"] + moved["bwd"]
            for mode in fused:
                record(name, mode, fused[mode], eager[mode], moved[mode])
        fused, eager, nbytes = _ema_case(dev)
        record("ema_update/resnet50", "update", fused, eager, nbytes)

    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
