"""Reference implementations of the notebooks' exercises, with the signatures the notebooks use.

When a student has not written an exercise yet (its body still raises ``NotImplementedError``), its
check in ``deqlite.classroom.checks`` says so and hands back the function of the same name from this module,
so the rest of the notebook still runs. Where deqlite has the same thing built in, the reference
calls it; the others are written the way a student would, in plain torch. Every reference passes
its own check (``tests/classroom/test_checks*.py``).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..cells import ResidualBlock
from ..gradients import neumann_series, Phantom
from ..jacobian import hutchinson_frobenius
from ..jiio import augmented_map as jiio_augmented_map
from ..projections import Box, L2Ball
from ..trellis import causal_conv as trellis_causal_conv


# ---------------------------------------------------------------- notebook 01

def weight_tied_forward(W, U, b, x, n_layers):
    """n_layers of z ← tanh(z Wᵀ + x Uᵀ + b) from z = 0: the same layer, the input injected each time."""
    injection = x @ U.T + b
    z = torch.zeros(x.shape[0], W.shape[0], dtype=x.dtype, device=x.device)
    for _ in range(n_layers):
        z = torch.tanh(z @ W.T + injection)
    return z


def lipschitz_bound(W):
    """‖W‖₂, the largest singular value: a Lipschitz constant of z ↦ tanh(W z + u) (tanh' ≤ 1)."""
    return torch.linalg.matrix_norm(W, ord=2)


def linear_fixed_point(W, b):
    """z* with z* = z* Wᵀ + b for a batch of rows b: (I − W) z*ᵀ = bᵀ."""
    eye = torch.eye(W.shape[0], dtype=W.dtype, device=W.device)
    return torch.linalg.solve(eye - W, b.T).T


# ---------------------------------------------------------------- notebook 02

def _residual(z, fz) -> float:
    return ((fz - z).norm() / fz.norm()).item()


def forward_iteration(f, z0, tol=1e-6, max_iter=100):
    """z ← f(z) until ‖f(z) − z‖ / ‖f(z)‖ ≤ tol (whole batch) or max_iter evaluations.
    Returns (z, residuals), one residual per evaluation of f."""
    z, residuals = z0, []
    for _ in range(max_iter):
        fz = f(z)
        residuals.append(_residual(z, fz))
        if residuals[-1] <= tol:
            break
        z = fz
    return z, residuals


def anderson(f, z0, tol=1e-6, max_iter=100, m=5, lam=1e-4, scale_lam=True):
    """Anderson acceleration with memory m (see ``deqlite.solvers.anderson`` for the math): the
    weights α minimise ‖Σ α_i g_i‖ with Σ α = 1, regularized by λ (times the mean ‖g_i‖² when
    ``scale_lam``). Returns (z, residuals) like ``forward_iteration``."""
    X, F_ = [z0], [f(z0)]
    residuals = [_residual(X[0], F_[0])]
    while len(residuals) < max_iter and residuals[-1] > tol:
        G = torch.stack([fx - x for x, fx in zip(X, F_)], dim=1).flatten(2)     # (batch, n, D)
        H = G @ G.transpose(1, 2)
        s = H.diagonal(dim1=1, dim2=2).mean(dim=1) if scale_lam else torch.ones_like(H[:, 0, 0])
        eye = torch.eye(len(X), dtype=H.dtype, device=H.device)
        y = torch.linalg.solve(H + (lam * s + 1e-30)[:, None, None] * eye, torch.ones_like(H[:, 0]))
        alpha = y / y.sum(dim=1, keepdim=True)
        x = torch.einsum("bn,bn...->b...", alpha, torch.stack(F_, dim=1))        # Σ α_i f_i
        X, F_ = (X + [x])[-m:], (F_ + [f(x)])[-m:]
        residuals.append(_residual(X[-1], F_[-1]))
    return X[-1], residuals


def relative_residual(z, fz):
    """Per sample ‖f(z) − z‖ / ‖f(z)‖, shape (batch,)."""
    return (fz - z).flatten(1).norm(dim=1) / fz.flatten(1).norm(dim=1)


def anderson_weights(G):
    """α = H⁻¹1 / (1ᵀH⁻¹1), H = G Gᵀ: the weights with Σα = 1 minimising ‖αᵀ G‖."""
    y = torch.linalg.solve(G @ G.T, torch.ones(G.shape[0], dtype=G.dtype, device=G.device))
    return y / y.sum()


def iterations_to_tol(rho, tol):
    """How many forward iterations z ← f(z) a contraction with rate ρ needs before its residual
    ‖f(z) − z‖ is at most tol times the first one: each iteration multiplies the residual by ρ
    (at most; exactly for a map z ↦ ρ Q z + c with Q orthogonal), so after k of them it is ρᵏ
    times the first, and the answer is the smallest whole k with ρᵏ ≤ tol,

        k = ⌈ln tol / ln ρ⌉        (0 < ρ < 1, 0 < tol < 1; both logarithms are negative).

    For ρ close to 1, ln ρ ≈ −(1 − ρ) gives the rule of thumb k ≈ ln(1/tol) / (1 − ρ)."""
    return math.ceil(math.log(tol) / math.log(rho))


def broyden_update(B, dz, dg):
    """The "good" Broyden update of a batch of inverse-Jacobian estimates B ≈ J_g⁻¹, shape
    (batch, D, D), from one step dz = Δz and the change of the residual dg = Δg = g(z_new) − g(z),
    shapes (batch, D), one per sample (g(z) = f(z) − z):

        B_new = B + (Δz − B Δg) (Δzᵀ B) / (Δzᵀ B Δg).

    B_new Δg = B Δg + (Δz − B Δg) · 1 = Δz: the secant condition. The change is rank one, and by
    the Sherman–Morrison formula B_new⁻¹ is the Jacobian estimate B⁻¹ changed as little as
    possible (in Frobenius norm) to map Δz to Δg (Broyden 1965). A sample whose denominator
    Δzᵀ B Δg is zero (Δz = 0: a sample that has stopped moving) or not finite keeps its B, as in
    ``deqlite.solvers.broyden``. Returns a new tensor; B is not changed."""
    B_dg = (B @ dg[..., None])[..., 0]                          # B Δg       (batch, D)
    dzT_B = (dz[:, None, :] @ B)[:, 0]                          # Δzᵀ B      (batch, D)
    denom = (dzT_B * dg).sum(-1)                                # Δzᵀ B Δg   (batch,)
    ok = (denom.abs() > torch.finfo(B.dtype).tiny) & torch.isfinite(denom)
    safe = torch.where(ok, denom, torch.ones_like(denom))
    change = (dz - B_dg)[:, :, None] * dzT_B[:, None, :] / safe[:, None, None]
    return B + torch.where(ok[:, None, None], change, torch.zeros_like(change))


def anderson_fixed(f, z0, tol=1e-6, max_iter=100, m=5, lam=1e-4):
    """Notebook 02's ``anderson_with_a_bug``, fixed. Its weights were normalized by the sum of
    *all* the batch's y (``y / y.sum()``), so Σα = 1 held for the batch as a whole, not for each
    sample: with one sample that is the same thing, with a batch every α is about 1/batch too
    small and the iteration stalls. Normalized per sample, y / y.sum(dim=1, keepdim=True), it is
    Anderson acceleration (``anderson`` above, with the scaled ridge λ s)."""
    return anderson(f, z0, tol=tol, max_iter=max_iter, m=m, lam=lam)


# ---------------------------------------------------------------- notebook 03

def adjoint_solve(vjp, grad, tol=1e-10, max_iter=500):
    """g with g = Jᵀ g + grad, by iterating g ← vjp(g) + grad from g = 0 until
    ‖g_new − g‖ ≤ tol · ‖g_new‖ (at most max_iter products)."""
    g = torch.zeros_like(grad)
    for _ in range(max_iter):
        g_new = vjp(g) + grad
        if (g_new - g).norm() <= tol * g_new.norm():
            return g_new
        g = g_new
    return g


def linear_deq_grad(W, b, dl_dz):
    """∂ℓ/∂b = (I − W)⁻ᵀ ∂ℓ/∂z* for z* = W z* + b (rows)."""
    eye = torch.eye(W.shape[0], dtype=W.dtype, device=W.device)
    return torch.linalg.solve(eye - W.T, dl_dz.T).T


def attach_ift(f, z_star, x, tol=1e-10, max_iter=500):
    """z = f(z*, x) with a graph to x and to f's parameters, and a hook on z that replaces the
    incoming ∂ℓ/∂z by the adjoint u = Jᵀ u + ∂ℓ/∂z (J = ∂f/∂z at z*), solved by
    ``adjoint_solve`` with the products y ↦ Jᵀ y taken through one more application
    f0 = f(z0, x), z0 = z*.detach().requires_grad_(). Autograd then carries u through z's one
    step: uᵀ ∂f/∂θ and uᵀ ∂f/∂x, the implicit function theorem's gradient. Two applications of
    f in all, none during backward; z* itself (and any graph it carries) is left alone."""
    z_star = z_star.detach()                       # no path back into the solver's iterations
    z = f(z_star, x)                               # value f(z*, x), one step with a graph
    z0 = z_star.clone().requires_grad_()           # f as a function of z alone, at z*
    f0 = f(z0, x)

    def vjp(y):
        return torch.autograd.grad(f0, z0, y, retain_graph=True)[0]   # Jᵀ y, the graph kept

    def replace_by_adjoint(grad):                  # ∂ℓ/∂z  ↦  u = Jᵀ u + ∂ℓ/∂z
        return adjoint_solve(vjp, grad, tol=tol, max_iter=max_iter)

    z.register_hook(replace_by_adjoint)
    return z


def adjoint_error_bound(tol, lipschitz):
    """The adjoint iteration g ← Jᵀ g + grad stops at the first g_new with
    ‖g_new − g‖ ≤ tol · ‖g_new‖ and returns g_new. The exact adjoint g* = Jᵀ g* + grad gives
    g_new − g* = Jᵀ (g − g*), so (I − Jᵀ)(g_new − g*) = Jᵀ (g − g_new) and, with ‖J‖₂ ≤ L < 1,
    ‖g_new − g*‖ ≤ L/(1 − L) · ‖g_new − g‖ ≤ tol · L/(1 − L) · ‖g_new‖. J = L·I attains it. For
    L ≥ 1 no finite bound exists (J = I has no adjoint at all): math.inf."""
    if lipschitz >= 1:
        return math.inf
    return tol * lipschitz / (1 - lipschitz)


# ---------------------------------------------------------------- notebook 04


def deq_layer(f, z0, solver, ift, pretrain_depth=0):
    """One DEQ layer's forward pass in training, as ``deqlite.DEQ`` runs it.

    Warm-up (``pretrain_depth`` = k > 0): z_k = f(f(... f(z0))), k applications recorded by
    autograd (a weight-tied k-layer network, backpropagated through like any other); returns
    ``(z_k, None)``: no solve.

    Otherwise: z* = solver(f, z0) with autograd off (``torch.no_grad``), so the solver's iterations
    keep nothing for the backward pass, then ``ift.attach(z*, f)``: one application z = f(z*) with
    a graph, whose hook replaces the incoming ∂ℓ/∂z by the adjoint g = Jᵀ g + ∂ℓ/∂z* (implicit
    function theorem). Training memory is that of one application of f, whatever the number of
    iterations. Returns ``(z, stats)``, the solver's ``SolverStats``.
    """
    if pretrain_depth:
        z = z0
        for _ in range(pretrain_depth):
            z = f(z)
        return z, None
    with torch.no_grad():
        z_star, stats = solver(f, z0)
    return ift.attach(z_star, f), stats


def warm_start(cache, index, cold):
    """The starting states of a warm-started solve for a batch of samples: row r is
    ``cache[int(index[r])]``, the equilibrium sample ``index[r]`` reached the last time it was
    seen, if the cache holds one, else ``cold[r]`` (the cold start, zeros for a DEQ). A state near
    the new z* (the cell has changed a little since) has a small first residual, so the solve
    needs fewer evaluations. ``cache`` maps Python ints to one sample's state, detached; neither it
    nor ``cold`` is changed."""
    z0 = cold.clone()
    for r, i in enumerate(index.tolist()):
        if i in cache:
            z0[r] = cache[i]
    return z0


# ---------------------------------------------------------------- notebook 05

def hutchinson(f_z, z, probes):
    """Per-sample ‖J‖²_F / d from the probes (M, batch, d), differentiable
    (``deqlite.jacobian.hutchinson_frobenius``)."""
    return hutchinson_frobenius(f_z, z, probes=probes, create_graph=True)


def power_method(matvec, v0, n_iter):
    """|λ_max| of a symmetric matrix: v ← A v / ‖A v‖ n_iter times, then |vᵀ A v|."""
    v = v0 / v0.norm()
    for _ in range(n_iter):
        w = matvec(v)
        v = w / w.norm()
    return abs(float(v @ matvec(v)))


def hutchinson_variance(J, kind, n_probes):
    """The variance of the Hutchinson estimate (1/(M d)) Σ_m ‖v_mᵀ J‖² of ‖J‖²_F / d from M
    independent probes, one value per sample, for Jacobians J of shape (batch, d, d).

    With A = J Jᵀ (symmetric), one probe's estimate is vᵀ A v / d and
    vᵀ A v = Σ_i A_ii v_i² + 2 Σ_{i<j} A_ij v_i v_j, a sum of uncorrelated terms. Gaussian probes:
    Var(v_i²) = 2 and Var(v_i v_j) = 1, so Var(vᵀAv) = 2 Σ_i A_ii² + 4 Σ_{i<j} A_ij² = 2‖A‖²_F.
    Rademacher probes (±1): v_i² = 1 does not fluctuate, so only the off-diagonal part is left,
    2(‖A‖²_F − Σ_i A_ii²). Dividing the estimate by d divides its variance by d², and the mean of
    M independent estimates has 1/M of the variance of one."""
    d = J.shape[-1]
    A = J @ J.transpose(-2, -1)
    spread = A.square().sum((-2, -1))
    if kind == "rademacher":
        spread = spread - A.diagonal(dim1=-2, dim2=-1).square().sum(-1)
    return 2 * spread / (d * d * n_probes)


def jr_loss(cell, z_star, injection, task_loss, gamma, probes):
    """The Jacobian-regularized loss of one training step (Bai, Koltun, Kolter, ICML 2021):

        L = task_loss + γ · (1/B) Σ_b ‖J_f(z*_b)‖²_F / d,

    each sample's ‖J‖²_F / d estimated by Hutchinson from the given probes (M, B, d), with z*
    held fixed: one application f_z = cell(z, injection) at a fresh leaf copy z of z*, so that
    the penalty's gradient reaches the cell's weights and, through the injection, the layers
    before it, but not whatever computed z*. The batch mean is ``DEQ.jac_loss``'s convention
    (and that of a mean task loss): the weight γ does not depend on the batch size."""
    z = z_star.detach().requires_grad_()
    f_z = cell(z, injection)
    return task_loss + gamma * hutchinson_frobenius(f_z, z, probes=probes, create_graph=True).mean()


# ---------------------------------------------------------------- notebook 06

def fuse_two(b0, b1, down, up):
    """[b0 + nearest-upsample(up(b1)) to b0's size, b1 + down(b0)]: MDEQ's fusion of two branches."""
    return [b0 + F.interpolate(up(b1), size=b0.shape[-2:], mode="nearest"), b1 + down(b0)]


def state_numel(channels, height, width):
    """Entries of one sample's multiscale state: branch i has channels[i] maps of
    ⌈H/2^i⌉ × ⌈W/2^i⌉."""
    total = 0
    for c in channels:
        total += c * height * width
        height, width = -(-height // 2), -(-width // 2)
    return total


def conv_block(channels, expansion, groups):
    """MDEQ's residual block on (batch, C, H, W) feature maps, C = ``channels``, as a module whose
    ``forward(z, injection, mask=None)`` is one application of the weight-tied layer ::

        y = ReLU(GN₁(conv₁ z))            conv₁: 3×3, C → e·C channels (e = expansion), no bias
        y = GN₂(m ⊙ conv₂ y + u)          conv₂: 3×3, e·C → C, no bias; u: the injection,
                                          m: a dropout mask (batch, C, 1, 1), 1 when None
        f = GN₃(ReLU(y + z))              the residual connection, then a normalization

    with GroupNorms of ``groups`` groups (each sample normalized on its own, so a sample's output
    does not depend on its batch mates). Its submodules are ``conv1, norm1, conv2, norm2, norm3``:
    it is deqlite's ``ResidualBlock`` without weight normalization."""
    return ResidualBlock(channels, expansion=expansion, groups=groups, weight_norm=False)


def dropout_map(block, u, p):
    """The map f(z) = block(z, u, m) of one solve with variational dropout (Gal & Ghahramani 2016,
    as in MDEQ): ONE mask m, drawn here, once for this input, of shape (batch, channels, 1, 1)
    (whole channels, a draw per sample), with u's dtype and device,

        m[n, c] = 0 with probability p,  1/(1 − p) otherwise       (so E[m] = 1),

    and the same m at every call of f. f is then one fixed map, whose fixed point a solver can
    approach; a mask drawn inside f would change the map at every iteration."""
    keep = torch.full((u.shape[0], u.shape[1], 1, 1), 1 - p, dtype=u.dtype, device=u.device)
    m = torch.bernoulli(keep) / (1 - p)
    return lambda z: block(z, u, m)


# ---------------------------------------------------------------- notebook 07


def future_leak(model, tokens, t):
    """The largest change of the logits at positions s < t (0 < t < T) when every token at
    positions ≥ t is replaced by a different one ((token + 1) mod vocab_size), for a language model
    ``model(tokens) -> logits`` (batch, T, vocab). Compared in eval mode (in training mode every
    forward pass draws its own dropout masks), and the model is left in the mode it was in. For a
    causal model it is 0; for a DEQ, the solver's tolerance sets it."""
    changed = tokens.clone()
    changed[:, t:] = (tokens[:, t:] + 1) % model.vocab_size
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            before, after = model(tokens), model(changed)
    finally:
        model.train(was_training)
    return (before[:, :t] - after[:, :t]).abs().max().item()


def next_logits(model, tokens, z_prev=None):
    """One step of generation with a DEQ language model, warm-started by causality: the logits
    (batch, vocab) of the token after ``tokens`` (batch, T), and the equilibrium z* (batch, T, d),
    detached, for the next step.

    The equilibrium is causal, so the first T − 1 positions of z* for ``tokens`` are (up to the
    solver's tolerance) the equilibrium ``z_prev`` of ``tokens[:, :-1]``, found at the previous
    step: the solve starts there, z0 = [z_prev; 0] (only the new position starts cold), and
    needs fewer iterations. ``z_prev=None`` (the first step) starts from zeros. The model's
    forward, spelled out: x = embed_tokens(tokens), z* = deq(x, z0), logits = head(norm(z*))."""
    x = model.embed_tokens(tokens)
    z0 = None
    if z_prev is not None:
        z0 = torch.zeros_like(x)
        z0[:, :z_prev.shape[1]] = z_prev
    z = model.deq(x, z0)
    return model.head(model.norm(z[:, -1])), z.detach()


causal_conv = trellis_causal_conv      # exercise 3: deqlite's own, deqlite.trellis.causal_conv


# ---------------------------------------------------------------- notebook 08

def project_l2_ball(x, center, radius):
    """Each sample of x projected onto ‖x − center‖₂ ≤ radius (``deqlite.projections.L2Ball``)."""
    return L2Ball(radius, center=center)(x)


def augmented_map(f, loss, z, mu, x, alpha, project):
    """JIIO's T(z, μ, x) = (f(z, x), J_zᵀμ + ∇_zℓ, project(x − α (J_xᵀμ + ∇_xℓ))), with one
    evaluation of f and one reverse pass (``deqlite.jiio.augmented_map``)."""
    return jiio_augmented_map(f, loss, z, mu, x, alpha, project)[:3]


def pgd(model, images, labels, eps, k, step):
    """k steps x ← Π(x + step · g/‖g‖), g = ∇ₓ CE(head(z*(x)), y) (the norm per sample), Π the
    ball ‖x − images‖₂ ≤ eps and then the box [0, 1]; each solve warm-started from the last z*
    (``deqlite.train.adversarial.pgd_attack`` does the same)."""
    ball, box = L2Ball(eps, center=images), Box(0.0, 1.0)
    x, z = images.clone(), None
    for _ in range(k):
        x.requires_grad_(True)
        z = model.deq(model.stem(x), z0=z)
        g, = torch.autograd.grad(F.cross_entropy(model.head(z), labels, reduction="sum"), x)
        norm = g.flatten(1).norm(dim=1).clamp_min(1e-12).reshape(-1, *[1] * (x.dim() - 1))
        x, z = box(ball(x.detach() + step * g / norm)), z.detach()
    return x


# ---------------------------------------------------------------- notebook 09

def neumann_adjoint(vjp, grad, k):
    """Σ_{i<k} (Jᵀ)ⁱ grad with vjp(y) = Jᵀ y: k − 1 vector–Jacobian products
    (``deqlite.gradients.neumann_series``, the rule behind ``DEQ(backward="neumann")``)."""
    return neumann_series(vjp, grad, k)[0]


def phantom(f, z_star, x, k, tau):
    """z_k after k damped steps z_{j+1} = (1 − τ) z_j + τ f(z_j, x) from z_0 = z* (detached, so
    no gradient flows back into the solver), recorded by autograd: k evaluations of f.
    Backpropagating through z_k gives the unrolling-based phantom gradient (Geng et al., NeurIPS
    2021); at a fixed point, dz_k/dθ = τ Σ_{j<k} ((1 − τ) I + τ J)ʲ ∂f/∂θ, and k = 1, τ = 1 is JFB
    (``deqlite.gradients.Phantom``, the rule behind ``DEQ(backward="phantom")``)."""
    return Phantom(k=k, tau=tau).attach(z_star, lambda z: f(z, x))




def neumann_terms_needed(rho, tol):
    """The fewest terms k ≥ 1 of the Neumann series g_k = Σ_{i<k} (Jᵀ)ⁱ v for which the adjoint's
    relative error ‖g_k − g‖ / ‖g‖ is at most ``tol`` whatever v is, for a normal J with spectral
    radius ρ (0 < ρ < 1). The dropped tail is Σ_{i≥k} (Jᵀ)ⁱ v = (Jᵀ)ᵏ g, and for a normal J
    ‖(Jᵀ)ᵏ‖ = ρᵏ (reached when g lies along the eigenvector of the largest |λ|), so k is the
    smallest integer with ρᵏ ≤ tol: ⌈log tol / log ρ⌉, and at least 1."""
    k = max(1, math.ceil(math.log(tol) / math.log(rho)))
    while rho ** k > tol:                      # guard the rounding of the logarithms
        k += 1
    while k > 1 and rho ** (k - 1) <= tol:
        k -= 1
    return k


# ---------------------------------------------------------------- notebook 10

def data_parallel_gradient(model, x, y, world_size):
    """What DistributedDataParallel computes: each of world_size processes takes the gradient of
    its contiguous shard's mean loss; the gradients are averaged (all-reduce, divided by W)."""
    params = list(model.parameters())
    total = [torch.zeros_like(p) for p in params]
    for x_r, y_r in zip(x.tensor_split(world_size), y.tensor_split(world_size)):
        grads = torch.autograd.grad(F.cross_entropy(model(x_r), y_r), params)
        total = [t + g for t, g in zip(total, grads)]
    return [t / world_size for t in total]
