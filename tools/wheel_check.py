"""Checks an installed simnpo-fast from outside the repository (run with the venv's python, in a folder that is not
the repository; ``TRITON_INTERPRET=1`` on a CPU machine). Prints ``key=value`` lines and exits 1 on any failure.

* the package and its Triton kernels (``simnpo_fast.kernels``) are imported from the environment, not a source tree;
* the fused chunked SimNPO loss and its gradients equal the full-logits formula written here, in fp64;
* one Triton kernel launch (``backend="triton"``) equals the fp64 log-likelihood;
* ``import kernels`` gives the installed ``kernels`` distribution (Hugging Face's) where there is one.

Used by ``tests/test_install.py`` and ``python tools/envcheck.py wheel`` (``make test-wheel``).
"""
import importlib.metadata
import os
import sys

import torch

import simnpo_fast as sf
import simnpo_fast.kernels.seq_logprob as K


def fused_vs_formula() -> tuple:
    torch.manual_seed(0)
    B, T, d, V, beta, gamma = 2, 8, 16, 40, 2.5, 0.5
    h = torch.randn(B, T, d, dtype=torch.float64, requires_grad=True)
    w = torch.randn(V, d, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, V, (B, T))
    y[0, :3] = -100  # a prompt
    loss = sf.simnpo_loss(h, w, y, beta=beta, gamma=gamma, shift=False, backend="chunked")
    gh, gw = torch.autograd.grad(loss, (h, w))
    h2, w2 = h.detach().requires_grad_(), w.detach().requires_grad_()
    mask = y != -100
    tok = torch.log_softmax(h2 @ w2.T, -1).gather(-1, y.clamp(min=0)[..., None])[..., 0] * mask
    ref = (-2 / beta * torch.nn.functional.logsigmoid(-beta * tok.sum(1) / mask.sum(1) - gamma)).mean()
    rh, rw = torch.autograd.grad(ref, (h2, w2))
    return abs(loss - ref).item(), max((gh - rh).abs().max().item(), (gw - rw).abs().max().item())


def triton_vs_fp64() -> float:
    torch.manual_seed(1)
    x, wt, t = torch.randn(20, 16), torch.randn(48, 16), torch.randint(0, 48, (20,))
    lp, n = sf.sequence_logprob(x[None], wt, t[None], shift=False, backend="triton")
    want = torch.log_softmax(x.double() @ wt.double().T, -1).gather(-1, t[:, None]).sum().item()
    assert n.item() == 20
    return abs(lp[0].item() - want) / abs(want)


def hf_kernels() -> str:
    try:
        dist = importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        return "absent"
    import kernels

    same = os.path.samefile(kernels.__file__, dist.locate_file("kernels/__init__.py"))
    return f"{dist.version}" if same else f"SHADOWED by {kernels.__file__}"


def main() -> int:
    loss_err, grad_err = fused_vs_formula()
    checks = {
        "simnpo_fast": os.path.dirname(sf.__file__),
        "kernels_pkg": os.path.dirname(K.__file__),
        "loss_err": f"{loss_err:.3g}",
        "grad_err": f"{grad_err:.3g}",
        "triton_rel_err": f"{triton_vs_fp64():.3g}",
        "hf_kernels": hf_kernels().replace(" ", "_"),
    }
    for k, v in checks.items():
        print(f"{k}={v}")
    ok = (loss_err < 1e-12 and grad_err < 1e-12 and float(checks["triton_rel_err"]) < 1e-4
          and not checks["hf_kernels"].startswith("SHADOWED")
          and os.path.commonpath([checks["simnpo_fast"], sys.prefix]) == sys.prefix
          and os.path.commonpath([checks["kernels_pkg"], checks["simnpo_fast"]]) == checks["simnpo_fast"])
    print(f"ok={int(ok)}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
