"""Notebook 05's new exercises: the checks accept correct answers and reject typical wrong ones
with a message that names the mistake (the same three kinds of tests as test_checks.py)."""
import torch

from deqlite.classroom import checks, references


# ---- hutchinson_variance(J, kind, n_probes): correct answers and planted mistakes

def hutchinson_variance(J, kind, n_probes, A_from="JJt", rademacher_diag=True, gaussian_diag=False,
                        two=2, d_power=2, m_power=1, sqrt=False, batch_sum=False):
    d = J.shape[-1]
    A = J @ J.transpose(-2, -1) if A_from == "JJt" else J.transpose(-2, -1) @ J
    spread = A.square().sum((-2, -1))
    if (kind == "rademacher" and rademacher_diag) or (kind == "gaussian" and gaussian_diag):
        spread = spread - A.diagonal(dim1=-2, dim2=-1).square().sum(-1)
    var = two * spread / (d ** d_power * n_probes ** m_power)
    if batch_sum:
        var = var.sum()
    return var.sqrt() if sqrt else var


def hutchinson_variance_off_diagonal(J, kind, n_probes):
    """A correct alternative: the pairs i ≠ j written out with a mask, Gaussian adding the diagonal."""
    d = J.shape[-1]
    A = torch.einsum("bij,bkj->bik", J, J)
    off = ~torch.eye(d, dtype=torch.bool)
    var = 2 * (A * off).square().sum((-2, -1))
    if kind == "gaussian":
        var = var + 2 * A.diagonal(dim1=-2, dim2=-1).square().sum(-1)
    return var / d ** 2 / n_probes


def hutchinson_variance_svd(J, kind, n_probes):
    """A correct alternative: ‖J Jᵀ‖²_F = Σ σ⁴, and diag(J Jᵀ) = the squared row norms of J."""
    d = J.shape[-1]
    var = 2 * torch.linalg.svdvals(J).pow(4).sum(-1)
    if kind == "rademacher":
        var = var - 2 * J.square().sum(-1).square().sum(-1)
    return var / (d * d * n_probes)


def hutchinson_variance_in_place(J, kind, n_probes):
    J /= J.shape[-1] ** 0.5                          # "normalize first": changes the caller's J
    A = J @ J.transpose(-2, -1)
    spread = A.square().sum((-2, -1))
    if kind == "rademacher":
        spread = spread - A.diagonal(dim1=-2, dim2=-1).square().sum(-1)
    return 2 * spread / n_probes


def hutchinson_variance_loop(J, kind, n_probes):
    out = torch.zeros(len(J), dtype=torch.float64)   # a float64 buffer: float32 in, float64 out
    for b in range(len(J)):
        out[b] = hutchinson_variance(J[b:b + 1], kind, n_probes)[0]
    return out


# ---- jr_loss(cell, z_star, injection, task_loss, gamma, probes)

def hutchinson(f_z, z, probes):
    """The notebook's own hutchinson (exercise 1), which jr_loss calls."""
    total = 0
    for v in probes:
        vJ = torch.autograd.grad(f_z, z, v, create_graph=True, retain_graph=True)[0]
        total = total + vJ.flatten(1).square().sum(1)
    return total / (len(probes) * z[0].numel())


def jr_loss(cell, z_star, injection, task_loss, gamma, probes, at="z_star", hold="detach",
            detach_injection=False, reduce="mean", detach_penalty=False, task="keep", extra_d=False,
            first_probe=False, per_probe=False, backward=False, in_place=False, double=False):
    if at == "zeros":
        z_star = torch.zeros_like(z_star)
    elif at == "f":
        z_star = cell(z_star.detach(), injection)
    if hold == "detach":
        z = z_star.detach().requires_grad_()
    elif hold == "clone":
        z = z_star.clone().requires_grad_()          # a copy, but still on z*'s graph
    elif hold == "flag":
        z = z_star.requires_grad_()                  # the caller's tensor
    else:
        z = z_star
    if double:
        z = z_star.detach().double().requires_grad_()
    injection = injection.detach() if detach_injection else injection
    probes = probes[:1] if first_probe else probes
    if per_probe:                                    # a fresh application of f for every probe
        est = sum(hutchinson(cell(z, injection), z, v[None]) for v in probes) / len(probes)
    else:
        est = hutchinson(cell(z, injection), z, probes)
    penalty = est.sum() if reduce == "sum" else est if reduce == "none" else est.mean()
    penalty = penalty / z.shape[1] if extra_d else penalty
    penalty = penalty.detach() if detach_penalty else penalty
    if in_place:
        task_loss += gamma * penalty
        return task_loss
    base = {"keep": task_loss, "item": task_loss.item(), "none": 0}[task]
    total = base + gamma * penalty
    if backward:
        total.backward(retain_graph=True)
    return total


def jr_loss_written_out(cell, z_star, injection, task_loss, gamma, probes):
    """A correct alternative: a gradient-free leaf made with clone(), the mean written as a sum."""
    with torch.no_grad():
        z = z_star.clone()
    z.requires_grad_(True)
    penalty = hutchinson(cell.forward(z, injection), z, probes)
    return task_loss + gamma * penalty.sum() / len(penalty)


def jr_loss_shortcut(cell, z_star, injection, task_loss, gamma, probes):
    """A correct alternative: no penalty to compute when γ = 0, the batched hutchinson otherwise."""
    if gamma == 0:
        return task_loss
    z = z_star.detach().requires_grad_()
    f_z = cell(z, injection)
    vJ = torch.autograd.grad(f_z, z, probes, create_graph=True, is_grads_batched=True)[0]
    return task_loss + gamma * vJ.square().sum(-1).mean(0).mean() / z.shape[1]


CASES_05 = {
    "hutchinson_variance": (checks.check_hutchinson_variance, [
        hutchinson_variance, hutchinson_variance_off_diagonal, hutchinson_variance_svd,
        references.hutchinson_variance], [
        (lambda J, k, M: hutchinson_variance(J, k, M, A_from="JtJ"), r"A is JᵀJ"),
        (lambda J, k, M: hutchinson_variance(J, k, M, rademacher_diag=False),
         r"diagonal drops out of the Rademacher variance"),
        (lambda J, k, M: hutchinson_variance(J, k, M, gaussian_diag=True), r"Var\(v_i²\) = 2"),
        (lambda J, k, M: hutchinson_variance(J, k, M, two=1), r"factor 2 is missing"),
        (lambda J, k, M: hutchinson_variance(J, k, M, d_power=1), r"divided by d², not by d"),
        (lambda J, k, M: hutchinson_variance(J, k, M, d_power=0), r"variance is divided by d²"),
        (lambda J, k, M: hutchinson_variance(J, k, M, m_power=0), r"divided by M"),
        (lambda J, k, M: hutchinson_variance(J, k, M, m_power=2), r"not / M²"),
        (lambda J, k, M: hutchinson_variance(J, k, M, sqrt=True), r"standard deviation"),
        (lambda J, k, M: hutchinson_variance(J, k, M, batch_sum=True), r"One variance per sample"),
        (hutchinson_variance_in_place, r"changed its argument `J` in place"),
        (hutchinson_variance_loop, r"expected dtype torch.float32"),
    ]),
    "jr_loss": (checks.check_jr_loss, [jr_loss, jr_loss_written_out, jr_loss_shortcut,
                                       references.jr_loss], [
        (lambda *a: jr_loss(*a, reduce="sum"), r"summed over the batch"),
        (lambda *a: jr_loss(*a, reduce="none"), r"expected one number .* average"),
        (lambda *a: jr_loss(*a, at="zeros"), r"estimate at z = 0"),
        (lambda *a: jr_loss(*a, at="f"), r"Jacobian at f\(z\*\)"),
        (lambda *a: jr_loss(*a, extra_d=True), r"already divides by d"),
        (lambda *a: jr_loss(*a, first_probe=True), r"Only the first probe"),
        (lambda *a: jr_loss(*a, task="none"), r"task loss is missing"),
        (lambda *a: jr_loss(*a, task="item"), r"task loss's gradient is missing"),
        (lambda *a: jr_loss(*a, detach_penalty=True), r"JR term carries no gradient"),
        (lambda *a: jr_loss(*a, hold="clone"), r"flowed back through z\*.*Hold z\* fixed"),
        (lambda *a: jr_loss(*a, hold="flag"), r"requires_grad of the caller's z_star"),
        (lambda *a: jr_loss(*a, hold="none"), r"does not require grad.*fresh leaf copy"),
        (lambda *a: jr_loss(*a, detach_injection=True), r"injection's parameters"),
        (lambda *a: jr_loss(*a, per_probe=True), r"applied the cell 3 times for 3 probe"),
        (lambda *a: jr_loss(*a, backward=True), r"called .backward\(\)"),
        (lambda *a: jr_loss(*a, in_place=True), r"changed its argument `task_loss` in place"),
        (lambda *a: jr_loss(*a, double=True), r"dtype"),
    ]),
}

def test_the_variance_prediction_matches_sampled_estimates():
    """The reference formula against a real run of many probes, the Jacobian of a tanh cell."""
    g = torch.Generator().manual_seed(5)
    J = torch.randn(3, 6, 6, generator=g, dtype=torch.float64) * 0.4
    for kind in ("gaussian", "rademacher"):
        from deqlite.classroom.checks.nb05 import _sampled_variance
        sampled = _sampled_variance(J, kind, 3, 60000, seed=2)
        assert torch.allclose(references.hutchinson_variance(J, kind, 3), sampled, rtol=0.05)


def test_jr_loss_reference_gives_deqlites_jac_loss_gradient():
    """With the same probes, the reference's loss is CE + γ · DEQ.jac_loss, gradients included."""
    from deqlite.models import DEQClassifier
    torch.manual_seed(0)
    model = DEQClassifier(in_channels=1, image_size=8, n_classes=4, channels=2, hidden=6,
                          deq=dict(solver="anderson", tol=1e-10, max_iter=200)).double()
    x = torch.rand(5, 1, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 4, (5,))
    seen = {}
    hook = model.deq.register_forward_hook(lambda m, a, out: seen.update(x=a[0], z=out))
    params = list(model.parameters())
    torch.manual_seed(1)
    with model.deq.options(jac_probes=2):
        logits = model(x)
    theirs = torch.autograd.grad(torch.nn.functional.cross_entropy(logits, y)
                                 + 2.0 * model.deq.jac_loss, params)
    torch.manual_seed(1)
    logits = model(x)
    probes = torch.randn(2, *seen["z"].shape, dtype=torch.float64)
    hook.remove()
    total = references.jr_loss(model.deq.cell, seen["z"], model.deq.cell.inject(seen["x"]),
                               torch.nn.functional.cross_entropy(logits, y), 2.0, probes)
    mine = torch.autograd.grad(total, params)
    for a, b in zip(mine, theirs):
        assert torch.allclose(a, b, rtol=1e-8, atol=1e-12)
