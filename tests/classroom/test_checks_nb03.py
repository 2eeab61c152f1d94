"""Notebook 03's new exercises: the checks accept correct answers written differently and reject
the mistakes students make, with a message that names the mistake."""
import math

import torch

from deqlite.classroom import checks, references




# ---- attach_ift: correct answers

def attach_ift(f, z_star, x, tol=1e-10, max_iter=500, *, plus_grad=False, hook_on="z",
               retain=True, accumulate=False, f0_per_vjp=False, one_shot=False, cache=False,
               detach_x=False, detach_z=True, max_iter_used=None, dtype=None, at_zero=False,
               times=1):
    """The notebook's solution, or (with an option) one planted mistake."""
    z_in = z_star.detach() if detach_z else z_star
    z = f(z_in, x.detach() if detach_x else x)
    z0 = (torch.zeros_like(z_star) if at_zero else z_star).detach()
    z0 = (z0.to(dtype) if dtype else z0).requires_grad_()
    f0 = f(z0, x)

    def vjp(y):
        out = f(z0, x) if f0_per_vjp else f0
        if accumulate:                      # .backward() adds into z0.grad (and θ's, x's .grad)
            out.backward(y, retain_graph=True)
            return z0.grad
        return torch.autograd.grad(out, z0, y, retain_graph=retain)[0]

    stored, handle = [], []

    def hook(grad):
        if cache and stored:
            return stored[0]
        if one_shot:
            handle[0].remove()
        u = references.adjoint_solve(vjp, grad, tol=tol, max_iter=max_iter_used or max_iter)
        stored.append(u)
        return u + grad if plus_grad else u

    target = {"z": z, "z0": z0}[hook_on]
    for _ in range(times):
        handle.append(target.register_hook(hook))
    return z


def attach_ift_one_graph(f, z_star, x, tol=1e-10, max_iter=500, guard=True):
    """A correct alternative with one application of f: the VJPs run back through the output
    itself, so the hook must let its own products pass (deqlite's IFT does this); wrong without
    the guard (the hook fires inside its own VJPs)."""
    z0 = z_star.detach().requires_grad_()
    z = f(z0, x)
    busy = []

    def vjp(y):
        return torch.autograd.grad(z, z0, y, retain_graph=True)[0]

    def hook(grad):
        if guard and busy:
            return grad
        busy.append(True)
        try:
            return references.adjoint_solve(vjp, grad, tol, max_iter)
        finally:
            busy.clear()

    z.register_hook(hook)
    return z


def attach_ift_func(f, z_star, x, tol=1e-10, max_iter=500):
    """A correct alternative: the products from torch.func.vjp, the hook on the output."""
    z_star = z_star.detach()
    z = f(z_star, x)
    _, vjp_fn = torch.func.vjp(lambda z_: f(z_, x.detach()), z_star)
    z.register_hook(lambda grad: references.adjoint_solve(lambda y: vjp_fn(y)[0], grad, tol, max_iter))
    return z


def attach_ift_lazy(f, z_star, x, tol=1e-10, max_iter=500):
    """A correct alternative: f0 built at the first backward, then kept."""
    z_star = z_star.detach()
    z, kept = f(z_star, x), {}

    def hook(grad):
        if not kept:
            z0 = z_star.clone().requires_grad_()
            with torch.enable_grad():
                kept.update(z0=z0, f0=f(z0, x))
        def vjp(y):
            return torch.autograd.grad(kept["f0"], kept["z0"], y, retain_graph=True)[0]
        return references.adjoint_solve(vjp, grad, tol, max_iter)

    z.register_hook(hook)
    return z


def attach_ift_resolving(f, z_star, x, tol=1e-10, max_iter=500):
    """Solves for z* again inside (a few more applications of f), then the solution."""
    with torch.no_grad():
        z = z_star
        for _ in range(5):
            z = f(z, x)
    return attach_ift(f, z, x, tol, max_iter)


def attach_ift_flag(f, z_star, x, tol=1e-10, max_iter=500):
    """The hook on z* itself: z*.requires_grad_() changes the caller's tensor, and a hook there
    never changes what reaches θ."""
    z_star.requires_grad_()
    z = f(z_star, x)
    z_star.register_hook(lambda grad: grad)
    return z


def attach_ift_no_graph(f, z_star, x, tol=1e-10, max_iter=500):
    """Applies f under no_grad (the forward 'has no graph'), so nothing reaches θ or x."""
    with torch.no_grad():
        z = f(z_star, x)
    return z


def O(**kw):
    """attach_ift with one planted mistake (the options of attach_ift above)."""
    return lambda f, z, x, tol=1e-10, max_iter=500: attach_ift(f, z, x, tol, max_iter, **kw)


# ---- adjoint_error_bound: correct answers and mistakes

def bound(tol, lipschitz):
    return tol * lipschitz / (1 - lipschitz) if lipschitz < 1 else math.inf


def bound_other_form(tol, lipschitz):
    if lipschitz >= 1:
        return float("inf")
    return tol * (1 / (1 - lipschitz) - 1)


def bound_torch(tol, lipschitz):
    L = torch.tensor(lipschitz, dtype=torch.float64)
    return torch.where(L < 1, tol * L / (1 - L), torch.tensor(math.inf, dtype=torch.float64))


def guarded(expr):
    return lambda tol, L: expr(tol, L) if L < 1 else math.inf


CASES_03 = {
    "attach_ift": (checks.check_attach_ift, [
        attach_ift, attach_ift_one_graph, attach_ift_func, attach_ift_lazy, references.attach_ift,
    ], [
        (O(plus_grad=True), "counted twice"),
        (O(hook_on="z0"), "never replaced the gradient"),
        (attach_ift_flag, "requires_grad flag was changed"),
        (O(retain=False), "retain_graph=True"),
        (O(accumulate=True), "autograd.grad\\(f0, z0, y"),
        (O(f0_per_vjp=True), "build f0 = f\\(z0, x\\) once"),
        (attach_ift_resolving, "f was applied 7 times"),
        (O(one_shot=True), "not remove itself after the first"),
        (O(cache=True), "not reuse a stored adjoint"),
        (O(times=2), "ran twice per backward"),
        (O(detach_x=True), "no gradient reached x"),
        (O(detach_z=False), "iterations that produced z\\*"),
        (O(max_iter_used=1000), "pass max_iter on"),
        (O(dtype=torch.float64), "dtype"),
        (O(at_zero=True), "entries are off"),
        (lambda f, z, x, tol=1e-10, max_iter=500: attach_ift_one_graph(f, z, x, tol, max_iter,
                                                                        guard=False),
         "ran again inside its own VJPs"),
        (attach_ift_no_graph, "has no graph"),
    ]),
    "adjoint_error_bound": (checks.check_adjoint_error_bound, [
        bound, bound_other_form, bound_torch, references.adjoint_error_bound,
    ], [
        (guarded(lambda tol, L: tol / (1 - L)), "previous iterate"),
        (guarded(lambda tol, L: tol), "can be larger than tol"),
        (guarded(lambda tol, L: tol * L), "exceeds your bound"),
        (guarded(lambda tol, L: tol * L / (1 - L) ** 2), "not the smallest"),
        (guarded(lambda tol, L: L / (1 - L)), "not the smallest"),
        (guarded(lambda tol, L: tol * L / (1 + L)), "exceeds your bound"),
        (lambda tol, L: tol * L / (1 - L), "ZeroDivisionError.*return math.inf before dividing"),
        (lambda tol, L: tol * L / (1 - L) if L != 1 else math.inf, "expected math.inf"),
        (lambda tol, L: tol * L / (1 - L) if L < 1 else None, "should return a number"),
        (guarded(lambda tol, L: tol / (1 / L - 1)), "ZeroDivisionError.*no division by L"),
    ]),
}
