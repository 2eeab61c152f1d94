"""Notebook 02's new exercises (draft): the checks accept correct answers written differently and
reject the mistakes a student really makes, with a message that names the mistake."""
import math

import pytest
import torch

from deqlite.classroom import checks, references
from deqlite.classroom.checks import CheckFailed, _harness


# ---- iterations_to_tol

def iterations_loop(rho, tol):
    """A correct alternative: multiply by ρ until the residual is below tol."""
    k, residual = 0, 1.0
    while residual > tol:
        residual *= rho
        k += 1
    return k


def iterations_capped(rho, tol):
    """The loop, with a cap that is too small for ρ close to 1."""
    k = 0
    while rho ** k > tol and k < 10000:
        k += 1
    return k


def iterations_torch(rho, tol):
    """A correct alternative in torch: a one-element float tensor holding a whole number."""
    rho, tol = torch.tensor(rho, dtype=torch.float64), torch.tensor(tol, dtype=torch.float64)
    return torch.ceil(torch.log(tol) / torch.log(rho))


L = lambda rho, tol: math.log(tol) / math.log(rho)  # noqa: E731


# ---- broyden_update

def bmv(B, v):
    return (B @ v[..., None])[..., 0]


def broyden_einsum(B, dz, dg):
    """A correct alternative: einsum, and a relative test for a zero denominator."""
    B_dg = torch.einsum("bij,bj->bi", B, dg)
    v = torch.einsum("bi,bij->bj", dz, B)
    denom = torch.einsum("bj,bj->b", v, dg)
    ok = denom.abs() > 1e-14 * v.norm(dim=1) * dg.norm(dim=1)
    u = (dz - B_dg) / torch.where(ok, denom, torch.ones_like(denom))[:, None]
    return torch.where(ok[:, None, None], B + torch.einsum("bi,bj->bij", u, v), B)


def broyden_loop(B, dz, dg):
    """A correct alternative: one sample at a time, skipping a zero denominator."""
    out = []
    for Bi, s, y in zip(B, dz, dg):
        denom = s @ Bi @ y
        out.append(Bi.clone() if denom == 0 else Bi + torch.outer(s - Bi @ y, s @ Bi) / denom)
    return torch.stack(out)


def broyden_via_jacobian(B, dz, dg):
    """A correct alternative: update the Jacobian estimate J = B⁻¹ (J + (Δg − JΔz)Δzᵀ/ΔzᵀΔz) and
    invert it (Sherman–Morrison says it is the same), where Δzᵀ B Δg ≠ 0."""
    J = torch.linalg.inv(B)
    ok = (bmv(B.transpose(1, 2), dz) * dg).sum(-1) != 0
    dzdz = torch.where(ok, (dz * dz).sum(-1), torch.ones_like(dz[:, 0]))
    J_new = J + (dg - bmv(J, dz))[:, :, None] * dz[:, None, :] / dzdz[:, None, None]
    J_new = torch.where(ok[:, None, None], J_new, J)
    return torch.where(ok[:, None, None], torch.linalg.inv(J_new), B)


def broyden(B, dz, dg, guard="where", eps=0.0, threshold=0.0, row="dzB", denominator="dzBdg",
            sign=1, in_place=False, double=False):
    """Variants: guard "where" (skip a zero denominator), "none" (0/0), "nan_to_num"; eps added to
    the denominator; an absolute threshold; row "dzB" (Δzᵀ B), "Bdz" (B Δz), "dg" (bad Broyden);
    the denominator "dzBdg", "dzdg" or "batch" (summed over the batch); the sign; in place."""
    if double:
        B, dz, dg = B.double(), dz.double(), dg.double()
    B_dg = bmv(B, dg)
    dzT_B = bmv(B.transpose(1, 2), dz)
    r = {"dzB": dzT_B, "Bdz": bmv(B, dz), "dg": dg}[row]
    denom = {"dzBdg": (dzT_B * dg).sum(-1), "dzdg": (dz * dg).sum(-1),
             "batch": (dzT_B * dg).sum().expand(B.shape[0])}[denominator]
    if row == "dg":
        denom = (dg * dg).sum(-1)
    denom = denom + eps
    ok = denom.abs() > threshold
    if guard == "where":
        safe = torch.where(ok, denom, torch.ones_like(denom))
    else:
        safe = denom
    change = sign * (dz - B_dg)[:, :, None] * r[:, None, :] / safe[:, None, None]
    if guard == "where":
        change = torch.where(ok[:, None, None], change, torch.zeros_like(change))
    elif guard == "nan_to_num":
        change = torch.nan_to_num(change)
    if in_place:
        B += change
        return B
    return B + change


def broyden_jacobian_update(B, dz, dg):
    """The update of a Jacobian estimate applied to the inverse estimate B."""
    return B + (dg - bmv(B, dz))[:, :, None] * dz[:, None, :] / (dz * dz).sum(-1)[:, None, None]


def broyden_outer_flipped(B, dz, dg):
    dzT_B = bmv(B.transpose(1, 2), dz)
    denom = (dzT_B * dg).sum(-1)
    ok = denom != 0
    safe = torch.where(ok, denom, 1.0)[:, None, None]
    change = dzT_B[:, :, None] * (dz - bmv(B, dg))[:, None, :] / safe
    return torch.where(ok[:, None, None], B + change, B)


# ---- anderson_fixed

def anderson_given(f, z0, tol=1e-6, max_iter=100, m=5, lam=1e-4, fix=True, batch_ridge=False,
                   window=0, mix_x=False, extra_eval=False, forever=False, fixed_lam=False,
                   eye64=False, wrong_dim=False, in_place=False):
    """Notebook 02's anderson_with_a_bug, fixed (fix=True), or left as it is, or fixed with
    another mistake added."""
    Xs, Fs = [z0], [f(z0)]
    residuals = [((Fs[0] - Xs[0]).norm() / Fs[0].norm()).item()]
    while (forever or len(residuals) < max_iter) and residuals[-1] > tol:
        R = torch.stack(Fs, 1).flatten(2) - torch.stack(Xs, 1).flatten(2)
        H = torch.einsum("bid,bjd->bij", R, R)
        s = H.diagonal(dim1=1, dim2=2).mean() if batch_ridge else H.diagonal(dim1=1, dim2=2).mean(1)
        ridge = (lam if fixed_lam else lam * s) + 1e-30 * torch.ones(H.shape[0], dtype=H.dtype)
        eye = torch.eye(len(Xs), dtype=torch.float64 if eye64 else H.dtype)
        w = torch.linalg.solve(H + ridge[:, None, None] * eye, torch.ones_like(H[:, :, 0]))
        if wrong_dim:
            alpha = w / w.sum(0, keepdim=True)
        else:
            alpha = w / w.sum(1, keepdim=True) if fix else w / w.sum()
        x = (alpha[:, :, None] * torch.stack(Xs if mix_x else Fs, 1).flatten(2)).sum(1)
        x = x.reshape(z0.shape).to(z0.dtype if not eye64 else x.dtype)
        Xs, Fs = (Xs + [x])[-(m + window):], (Fs + [f(x)])[-(m + window):]
        fx = f(Xs[-1]) if extra_eval else Fs[-1]
        residuals.append(((fx - Xs[-1]).norm() / fx.norm()).item())
    if in_place:
        z0.copy_(Xs[-1])
        return z0, residuals
    return Xs[-1], residuals


def anderson_own(f, z0, tol=1e-6, max_iter=100, m=5, lam=1e-4, scale_lam=True):
    """The notebook's own anderson exercise, reused as the fix (it takes one more option)."""
    X, F = [z0], [f(z0)]
    residuals = [((F[0] - X[0]).norm() / F[0].norm()).item()]
    while len(residuals) < max_iter and residuals[-1] > tol:
        G = torch.stack([fx - x for x, fx in zip(X, F)], dim=1).flatten(2)
        H = G @ G.transpose(1, 2)
        s = H.diagonal(dim1=1, dim2=2).mean(dim=1) if scale_lam else torch.ones_like(H[:, 0, 0])
        eye = torch.eye(len(X), dtype=H.dtype, device=H.device)
        y = torch.linalg.solve(H + (lam * s + 1e-30)[:, None, None] * eye, torch.ones_like(H[:, 0]))
        alpha = y / y.sum(dim=1, keepdim=True)
        x = torch.einsum("bn,bn...->b...", alpha, torch.stack(F, dim=1))
        X, F = (X + [x])[-m:], (F + [f(x)])[-m:]
        residuals.append(((F[-1] - X[-1]).norm() / F[-1].norm()).item())
    return X[-1], residuals


def anderson_one_sample_at_a_time(f, z0, tol=1e-6, max_iter=100, m=5, lam=1e-4):
    """A correct alternative: the given function's normalization, on one sample's y at a time."""
    Xs, Fs = [z0], [f(z0)]
    residuals = [((Fs[0] - Xs[0]).norm() / Fs[0].norm()).item()]
    while len(residuals) < max_iter and residuals[-1] > tol:
        R = torch.stack(Fs, 1).flatten(2) - torch.stack(Xs, 1).flatten(2)
        rows = []
        for b in range(z0.shape[0]):
            H = R[b] @ R[b].T
            Hr = H + (lam * H.diagonal().mean() + 1e-30) * torch.eye(len(Xs), dtype=H.dtype)
            w = torch.linalg.solve(Hr, torch.ones(len(Xs), dtype=H.dtype))
            alpha = w / w.sum()
            rows.append((alpha[:, None] * torch.stack(Fs, 1)[b].flatten(1)).sum(0))
        x = torch.stack(rows).reshape(z0.shape)
        Xs, Fs = (Xs + [x])[-m:], (Fs + [f(x)])[-m:]
        residuals.append(((Fs[-1] - Xs[-1]).norm() / Fs[-1].norm()).item())
    return Xs[-1], residuals


def a(**options):
    return lambda f, z0, tol=1e-6, max_iter=100, m=5, lam=1e-4: anderson_given(
        f, z0, tol, max_iter, m, lam, **options)


W_ = "expected dtype torch.float32"

CASES_02 = {
    "iterations_to_tol": (checks.check_iterations_to_tol, [
        lambda rho, tol: math.ceil(math.log(tol) / math.log(rho)),
        iterations_loop,
        iterations_torch,
        lambda rho, tol: math.ceil(math.log10(tol) / math.log10(rho)),
        references.iterations_to_tol,
    ], [
        (lambda rho, tol: int(L(rho, tol)), "rounded down"),                     # truncation
        (lambda rho, tol: round(L(rho, tol)), "rounded down"),
        (lambda rho, tol: L(rho, tol), "not a whole number.*Round up"),           # the raw float
        (lambda rho, tol: math.ceil(math.log(rho) / math.log(tol)), "swapped"),
        (lambda rho, tol: math.ceil(math.log10(tol) / math.log(rho)), "different bases"),
        (lambda rho, tol: math.ceil(math.log(tol) / math.log(1 - rho)), "not by 1 − ρ"),
        (lambda rho, tol: math.ceil(math.log(1 / tol) / (1 - rho)), "rule of thumb"),
        (lambda rho, tol: math.ceil(math.log(tol) / math.log(1 / rho)), "negative.*wrong sign"),
        (lambda rho, tol: math.ceil(L(rho, tol)) + 1, "One too many"),
        (lambda rho, tol: math.ceil(L(rho, tol) / 2), "half the answer"),
        (iterations_capped, r"0\.9999, 1e-06\).*after 10000 iterations"),         # a loop's cap
        (lambda rho, tol: torch.ceil(torch.tensor(tol).log() / torch.tensor(rho).log()),
         "computed in float32"),                                                    # dtype
        (lambda rho, tol: None, "whole number of iterations, got None"),
        (lambda rho, tol: torch.tensor([10.0, 11.0]), "one number, got a tensor of shape"),
    ]),
    "broyden_update": (checks.check_broyden_update, [
        broyden,
        broyden_einsum,
        broyden_loop,
        broyden_via_jacobian,
        references.broyden_update,
    ], [
        (lambda B, dz, dg: broyden(B, dz, dg, in_place=True), "changed its argument `B` in place"),
        (lambda B, dz, dg: broyden(B, dz, dg, row="dg"), "bad\\* Broyden"),
        (lambda B, dz, dg: broyden(B, dz, dg, row="Bdz"), "not `B @ dz`"),
        (broyden_outer_flipped, "wrong way round"),
        (lambda B, dz, dg: broyden(B, dz, dg, denominator="dzdg"), "not Δzᵀ Δg"),
        (lambda B, dz, dg: broyden(B, dz, dg, sign=-1), "is \\*added\\*"),
        (broyden_jacobian_update, "\\*Jacobian\\* estimate"),
        (lambda B, dz, dg: broyden(B, dz, dg, denominator="batch"),
         "not a sum over the whole batch"),
        (lambda B, dz, dg: broyden(B, dz, dg, guard="none"), "NaN or inf.*would divide by zero"),
        (lambda B, dz, dg: broyden(B, dz, dg, guard="none", eps=1e-30), "Adding a small eps"),
        (lambda B, dz, dg: broyden(B, dz, dg, guard="nan_to_num"), "its B changed.*nan_to_num"),
        (lambda B, dz, dg: broyden(B, dz, dg, threshold=1e-10), "tiny steps.*absolute threshold"),
        (lambda B, dz, dg: broyden(B, dz, dg, double=True), W_),
        (lambda B, dz, dg: broyden(B, dz, dg)[:, 0], "expected shape"),
    ]),
    "anderson_fixed": (checks.check_anderson_fixed, [
        a(),
        anderson_own,
        anderson_one_sample_at_a_time,
        references.anderson_fixed,
    ], [
        (a(fix=False), "the bug is still in it"),
        (a(batch_ridge=True), "must not depend on the other samples"),
        (a(wrong_dim=True), "must not depend on the other samples"),
        (a(window=1), "exactly the last m pairs: drop the oldest"),
        (a(window=-1), "not m − 1"),
        (a(mix_x=True), "The new iterate is Σ α_i f\\(x_i\\), not Σ α_i x_i"),
        (a(fixed_lam=True), "The ridge is lam · s.*averaging"),
        (a(extra_eval=True), "evaluated f .* times for"),
        (a(forever=True), "more than .* times"),
        (a(in_place=True), "changed its argument `z0` in place"),
        (a(eye64=True), "different dtypes"),
        (lambda f, z0, tol=1e-6, max_iter=100, m=5, lam=1e-4:
         (lambda z, r: (z.double(), r))(*a()(f, z0, tol, max_iter, m, lam)), W_),
        (lambda f, z0, tol=1e-6, max_iter=100, m=5, lam=1e-4:
         references.forward_iteration(f, z0, tol, max_iter), "m=2.*residual 2.*not m − 1"),
    ]),
}

def test_the_reference_anderson_is_not_a_fix():
    with pytest.raises(CheckFailed, match="reference anderson, not your fix"):
        checks.check_anderson_fixed(references.anderson)


def test_the_notebooks_buggy_anderson_is_the_checks():
    """The locked cell of notebook 02 and the check's copy of it are the same function."""
    import json
    from pathlib import Path
    nb = json.loads((Path(__file__).parents[2] / "notebooks" / "02_fixed_point_solvers.ipynb")
                    .read_text())
    source = next("".join(c["source"]) for c in nb["cells"]
                  if "".join(c["source"]).startswith("def anderson_with_a_bug("))
    namespace = {"torch": torch}
    exec(source, namespace)
    W, U, b, x = _harness._tanh_problem(3, batch=3, d=5, scale=0.9)
    f = lambda z: torch.tanh(z @ W.T + x @ U.T + b)  # noqa: E731
    z0 = torch.zeros(3, 5, dtype=torch.float64)
    from deqlite.classroom.checks.nb02 import _anderson_with_a_bug
    assert namespace["anderson_with_a_bug"](f, z0, 1e-10, 20, 3)[1] == \
        _anderson_with_a_bug(f, z0, 1e-10, 20, 3)[1]
