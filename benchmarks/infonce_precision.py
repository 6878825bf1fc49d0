"""Precision of MoCo's queue logits: error of the InfoNCE loss and of dq against fp64, per operand precision.

    python benchmarks/infonce_precision.py [--batch 16] [--no-kernel] [--json PATH]

K = 65536 negatives of D = 256, T = 0.2, q and keys L2-normalised as MoCo makes them. Two kinds of
inputs: "random" (uniform on the sphere: logits within about +-1.5, as at the start of training) and
"clustered" (keys and queries near 512 shared directions, cosine up to about 0.9: logits up to 5, as
once features have formed). The reference is the same fp32 inputs in fp64.

Triton's interpreter computes ``tl.dot`` in fp32 whatever ``input_precision`` says, so the tensor
cores' arithmetic is emulated in torch on the CPU, products accumulated in fp32:
  fp32    plain fp32 products (the reference's torch matmul, TF32 off)
  tf32x3  a = big + small, big = rna(a), small = rna(a - big) (cvt.rna.tf32.f32 as Triton emits it),
          big*small + small*big + big*big; the small*small term is dropped
  tf32    fp32 operands with the low 13 mantissa bits dropped (Triton hands fp32 registers to
          mma .tf32 without a conversion; the tensor core reads the top 19 bits)
  bf16    operands rounded to bf16 (q and queue stored in bf16), p rounded to bf16 before the dq
          product (the kernel casts p to the queue's dtype)
The softmax, its log-sum-exp and the positive logit are fp32 in every row, as in the kernel. The
row "kernel (interpreter)" runs the Triton kernels themselves: fp32 dots, a check that the
emulation's bookkeeping (splits, positive logit, scaling) matches the kernel.
"""
import argparse
import json
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: the kernel row runs on the CPU

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from lcr_fast.kernels import BACKEND, infonce_queue  # noqa: E402

K, D, T = 65536, 256, 0.2
PRECISIONS = ("fp32", "tf32x3", "tf32", "bf16")


def tf32_truncated(x: torch.Tensor) -> torch.Tensor:
    return (x.view(torch.int32) & -(1 << 13)).view(torch.float32)


def tf32_rna(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest, ties away from zero: adding half an ulp to the magnitude works on sign-magnitude bits."""
    return ((x.view(torch.int32) + (1 << 12)) & -(1 << 13)).view(torch.float32)


def matmul(a: torch.Tensor, b: torch.Tensor, precision: str) -> torch.Tensor:
    """fp32 [M, D] @ [D, N] as the tensor cores compute it at ``precision``."""
    if precision == "fp32":
        return a @ b
    if precision == "tf32":
        return tf32_truncated(a) @ tf32_truncated(b)
    if precision == "tf32x3":
        a_big, b_big = tf32_rna(a), tf32_rna(b)
        a_small, b_small = tf32_rna(a - a_big), tf32_rna(b - b_big)
        return (a_big @ b_small + a_small @ b_big) + a_big @ b_big
    return a.bfloat16().float() @ b.bfloat16().float()


def emulated(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, precision: str) -> dict:
    """Logits, loss and dq (upstream gradient 1) of the kernel's math with products at ``precision``."""
    if precision == "bf16":
        q, k, queue = (t.bfloat16().float() for t in (q, k, queue))
    s = matmul(q, queue, precision) / T
    pos = (q * k).sum(1) / T
    lse = torch.logsumexp(torch.cat([pos[:, None], s], 1), 1)
    p = torch.exp(s - lse[:, None])
    neg = matmul(p, queue.T.contiguous(), precision)
    dq = ((torch.exp(pos - lse) - 1)[:, None] * k + neg) / (q.shape[0] * T)
    return {"logits": s, "loss": (lse - pos).mean(), "dq": dq}


def kernel(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor) -> dict:
    q = q.clone().requires_grad_(True)
    with BACKEND.using("triton"):  # the kernel, whatever LCR_KERNELS says
        loss = infonce_queue(q, k, queue, T)
        (dq,) = torch.autograd.grad(loss, q)
    return {"loss": loss.detach(), "dq": dq}


def reference(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor) -> dict:
    """In fp64 throughout (infonce_queue_torch rounds its logits to fp32, as the reference code does)."""
    q64, k64, queue64 = q.double().requires_grad_(True), k.double(), queue.double()
    s = q64 @ queue64 / T
    pos = (q64 * k64).sum(1) / T
    loss = (torch.logsumexp(torch.cat([pos[:, None], s], 1), 1) - pos).mean()
    (dq,) = torch.autograd.grad(loss, q64)
    return {"logits": s.detach(), "loss": loss.detach(), "dq": dq}


def inputs(kind: str, batch: int, gen: torch.Generator) -> tuple:
    if kind == "random":
        q = F.normalize(torch.randn(batch, D, generator=gen), dim=1)
        k = F.normalize(q + 0.5 * torch.randn(batch, D, generator=gen) / D ** 0.5, dim=1)
        queue = F.normalize(torch.randn(D, K, generator=gen), dim=0)
        return q, k, queue
    centres = F.normalize(torch.randn(512, D, generator=gen), dim=1)

    def near(n):
        picks = centres[torch.randint(0, 512, (n,), generator=gen)]
        return F.normalize(picks + 0.5 * torch.randn(n, D, generator=gen) / D ** 0.5, dim=1)

    q = near(batch)
    k = F.normalize(q + 0.3 * torch.randn(batch, D, generator=gen) / D ** 0.5, dim=1)
    return q, k, near(K).T.contiguous()


def errors(got: dict, ref: dict) -> dict:
    out = {"loss_abs": abs(got["loss"].double() - ref["loss"]).item(),
           "dq_rel": ((got["dq"].double() - ref["dq"]).norm() / ref["dq"].norm()).item(),
           "dq_max_rel": ((got["dq"].double() - ref["dq"]).abs().max() / ref["dq"].abs().max()).item()}
    if "logits" in got:
        out["logit_max_abs"] = (got["logits"].double() - ref["logits"]).abs().max().item()
    return out


def build_parser() -> argparse.ArgumentParser:
    """The options, unparsed: tests/test_docs.py checks the documentation's commands against them."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--no-kernel", action="store_true", help="skip the interpreter run of the kernels (minutes)")
    parser.add_argument("--json", help="write the table here")
    return parser


def main() -> None:
    args = build_parser().parse_args()

    rows = []
    for kind in ("random", "clustered"):
        q, k, queue = inputs(kind, args.batch, torch.Generator().manual_seed(0))
        ref = reference(q, k, queue)
        results = {p: emulated(q, k, queue, p) for p in PRECISIONS}
        if not args.no_kernel:
            results["kernel (interpreter)"] = kernel(q, k, queue)
        spread = ref["logits"].abs().max().item()
        for name, got in results.items():
            rows.append({"inputs": kind, "max_logit": spread, "precision": name, **errors(got, ref)})

    print(f"InfoNCE, B={args.batch}, K={K}, D={D}, T={T}: errors against fp64 on the same fp32 inputs")
    header = f"{'inputs':<10} {'|logit| max':>11} {'products':<21} {'logit max abs':>13} {'loss abs':>9} " \
             f"{'dq rel (norm)':>13} {'dq rel (max)':>12}"
    print(header)
    print("-" * len(header))
    for r in rows:
        logit = f"{r['logit_max_abs']:.1e}" if "logit_max_abs" in r else "-"
        print(f"{r['inputs']:<10} {r['max_logit']:>11.2f} {r['precision']:<21} {logit:>13} {r['loss_abs']:>9.1e} "
              f"{r['dq_rel']:>13.1e} {r['dq_max_rel']:>12.1e}")
    print("Products emulated in torch, fp32 accumulation: tf32x3 = three products of the cvt.rna big/small halves;\n"
          "tf32 = operands truncated to 10 mantissa bits; bf16 = operands (and p) rounded to bf16.\n"
          "kernel (interpreter) = the Triton kernels themselves, whose tl.dot the interpreter computes in fp32.")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
