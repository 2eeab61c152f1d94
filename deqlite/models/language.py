"""The DEQ-Transformer language model (Bai, Kolter, Koltun, "Deep Equilibrium Models",
NeurIPS 2019).

A Transformer language model stacks L different blocks over the embedded tokens. The DEQ version
keeps ONE block f, feeds the embedded input into it at every application ("input injection"), and
takes as its output the equilibrium of that block, the sequence of states z* = f(z*, x)::

    x_t  = √d · E[token_t] + P_t                      token embedding and position t     (inject)
    u    = W_u x + b_u                                the injection, computed once per input
    h    = z + u                                      the state, with the input added
    post-LN:  y = LN₁(h + m₁ ⊙ Attn(h))               causal multi-head self-attention
              f(z, x) = LN₂(y + m₂ ⊙ FFN(y))          FFN(y) = W₂ ReLU(W₁ y + b₁) + b₂
    pre-LN:   y = LN₂(h + m₁ ⊙ Attn(LN₁(h)))
              f(z, x) = y + m₂ ⊙ FFN(y)
    logits_t = W_out LN(z*_t) + b_out                 (W_out = E with tied weights)

The block f is ``deqlite.cells.TransformerCell`` (its docstring: causal attention, variational
dropout fixed within a solve, post- and pre-LN).

How the input enters. The DEQ paper injects x into the attention's projections, QKV = W z + U x;
here u is added to the state, so the attention sees W(z + u) = W z + (W W_u) x, the same kind of
injection, and u also enters the residual stream. Causality of the equilibrium: position t of
f(z, x) depends on z and x at positions ≤ t only, so the first t positions of z* solve their own
equation z*_{≤t} = f(z*_{≤t}, x_{≤t}), and (when that fixed point is unique) the output at t
does not depend on later tokens. A solver's iterates are causal only up to its tolerance: Anderson
mixes all positions with one set of weights and stops on the residual of the whole sequence.

Models (keyword-only options, validated):

* ``DEQTransformerLM``: embedding + positions → DEQ over a ``TransformerCell`` → LayerNorm →
  output layer. Character level by default; with ``cutoffs`` a word-level model with adaptive
  input embeddings (``AdaptiveInput``; Baevski & Auli, ICLR 2019) and torch's
  ``nn.AdaptiveLogSoftmaxWithLoss`` (Grave et al., ICML 2017).
* ``TransformerLM``: the explicit baseline, ``n_layers`` *untied* copies of the same block,
  z_k = f_k(z_{k−1}, x) from z_0 = 0: the network that the DEQ's unrolled warm-up runs, with
  different weights per layer. Its activation memory grows with n_layers; the DEQ's does not
  grow with the number of solver iterations (``deqlite.memory.saved_tensor_bytes``).

Every model has ``forward(tokens) -> logits (batch, T, V)`` (log-probabilities for the adaptive
softmax), ``loss(tokens, targets)`` (mean negative log-likelihood per token, in nats) and
``generate(prompt, n_new)``.

Transformer-XL's memory (``positions="relative"``, ``mem_len=M``; Dai et al., ACL 2019, as the
published DEQ-Transformer uses it). A text is read segment by segment; with ``mem_len`` the
block's cell is ``deqlite.transformer_xl.TransformerXLCell``: relative-position attention, and a memory
of the last M tokens before the segment (their equilibrium states z* and injections, detached)
that the segment's queries attend to as well:

    out = model.loss(tokens, targets, memory=memory)    # memory: None at the start of a text
    memory = model.next_memory                          # for the segment that follows

``next_memory`` keeps the last M tokens of [memory; segment] (``mem_len`` in training mode,
``eval_mem_len`` in eval mode; None when that is 0). Because the scores depend only on distances,
a segment read with the memory of the one before gets the equilibrium the block reaches on the
two concatenated (up to the solver's tolerance): the context of a token reaches back up to M
tokens past the segment's start. The trainer carries the memory from step to step along each
row of the token stream (``deqlite.train.tasks``). ``TransformerLM`` with relative positions is
the explicit Transformer-XL: each layer keeps the memory of its own input states.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .._validate import check_int_list, check_positive_ints, check_range, check_tensor, lookup
from ..cells import TransformerCell, check_dropout
from ..transformer_xl import Memory, TransformerXLCell
from ..deq import DEQ

POSITIONS = ("learned", "sinusoidal", "relative")


def sinusoidal_positions(max_len: int, d_model: int) -> torch.Tensor:
    """Vaswani et al. (2017), §3.5: P[t, 2i] = sin(t / 10000^(2i/d)), P[t, 2i+1] = cos(...)."""
    t = torch.arange(max_len, dtype=torch.float32)[:, None]
    i2 = torch.arange(0, d_model, 2, dtype=torch.float32)
    freq = torch.exp(-math.log(10000.0) * i2 / d_model)
    table = torch.zeros(max_len, d_model)
    table[:, 0::2] = torch.sin(t * freq)
    table[:, 1::2] = torch.cos(t * freq)[:, : d_model // 2]
    return table


def _check_cutoffs(cutoffs: Sequence[int], vocab_size: int) -> list:
    cutoffs = check_int_list(cutoffs, "cutoffs", high=vocab_size - 1,
                             example="[20000, 40000, 200000]")
    if cutoffs != sorted(set(cutoffs)):
        raise ValueError(f"cutoffs must increase strictly, e.g. [20000, 40000, 200000], got "
                         f"{cutoffs}.")
    return cutoffs


def _full_precision(h: torch.Tensor):
    """Autocast off: torch's adaptive softmax runs in its weights' dtype (under bf16 autocast its
    clusters' log-probabilities come out in another dtype than its output buffer, which fails)."""
    return torch.autocast(h.device.type, enabled=False)


class AdaptiveInput(nn.Module):
    """Adaptive input embeddings (Baevski & Auli, "Adaptive Input Representations for Neural
    Language Modeling", ICLR 2019). The vocabulary, sorted by frequency, is cut into clusters
    [0, c₁), [c₁, c₂), ..., [c_n, V); cluster i has its own table E_i of width d_i = d / k^i
    (k = ``div_value``) and a projection P_i (d_i × d) up to the model width, so that rare words
    get few parameters:  e(w) = E_i[w − c_i] P_i  (P_0 = I, d_0 = d).

    torch has no adaptive input layer, but its adaptive softmax (``nn.AdaptiveLogSoftmaxWithLoss``,
    Grave et al., ICML 2017) holds exactly these weights: its head scores the shortlist words w < c₁
    by h · H[w], and its tail cluster i scores the words of the cluster by (h P_iᵀ) · E_i[w − c_i]
    = h · e(w) (``tail[i−1]`` is Linear(d → d_i) with weight P_i, then Linear(d_i → |cluster|)
    with weight E_i). So the embedding here *reads* an adaptive softmax's weights,
    e(w) = H[w] or E_i[w − c_i] P_i: pass the model's output layer as ``weights`` to tie the input
    and output embeddings (Press & Wolf 2017; the DEQ-Transformer does), or let it make its own.
    """

    def __init__(self, vocab_size: int, d_model: int, cutoffs: Sequence[int],
                 div_value: float = 4.0, *,
                 weights: Optional[nn.AdaptiveLogSoftmaxWithLoss] = None):
        super().__init__()
        self.d_model = d_model
        self.weights = weights if weights is not None else nn.AdaptiveLogSoftmaxWithLoss(
            d_model, vocab_size, list(cutoffs), div_value=div_value)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(batch, T) token ids → (batch, T, d_model) embeddings."""
        table = self.weights
        bounds = [0, *table.cutoffs]                    # table.cutoffs ends with vocab_size
        out = table.head.weight.new_zeros(*tokens.shape, self.d_model)
        for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
            inside = (tokens >= lo) & (tokens < hi)
            ids = tokens[inside] - lo
            if i == 0:                                  # rows ≥ c₁ of H score clusters: unused
                out[inside] = F.embedding(ids, table.head.weight)
            else:
                projection, cluster = table.tail[i - 1]
                out[inside] = (F.embedding(ids, cluster.weight) @ projection.weight).to(out.dtype)
        return out


class _LanguageModel(nn.Module):
    """What both LMs share: tokens → x = √d·e(token) + P_t → ``_body`` → LayerNorm → output."""

    def __init__(self, *, vocab_size: int, d_model: int, max_len: int, dropout: float,
                 positions: str, tie_weights: bool, cutoffs: Optional[Sequence[int]],
                 div_value: float):
        super().__init__()
        check_positive_ints(vocab_size=vocab_size, d_model=d_model, max_len=max_len)
        check_dropout(dropout)
        lookup(POSITIONS, positions, "positions")
        if not isinstance(tie_weights, bool):
            raise TypeError(f"tie_weights must be True or False, got {tie_weights!r}.")
        check_range(div_value, "div_value", low=1)
        self.vocab_size, self.d_model, self.max_len = vocab_size, d_model, max_len
        if cutoffs is None:
            self.embed = nn.Embedding(vocab_size, d_model)
            nn.init.normal_(self.embed.weight, std=d_model ** -0.5)   # √d·e(w) ~ N(0, 1)
            self.head = nn.Linear(d_model, vocab_size)
            if tie_weights:                      # Press & Wolf 2017: logits = h · e(w) + b_w
                self.head.weight = self.embed.weight
            self.adaptive = None
        else:
            cutoffs = _check_cutoffs(cutoffs, vocab_size)
            self.adaptive = nn.AdaptiveLogSoftmaxWithLoss(d_model, vocab_size, cutoffs,
                                                          div_value=div_value)
            self.embed = AdaptiveInput(vocab_size, d_model, cutoffs, div_value,
                                       weights=self.adaptive if tie_weights else None)
        self.relative = positions == "relative"      # the cell encodes distances itself
        if positions == "learned":
            self.positions = nn.Parameter(torch.randn(max_len, d_model))
        elif positions == "sinusoidal":
            self.register_buffer("positions", sinusoidal_positions(max_len, d_model),
                                 persistent=False)
        else:
            self.positions = None
        self.next_memory = None                  # the memory for the segment after the last call
        self.drop = nn.Dropout(dropout)          # on x and on z*: outside the solve
        self.norm = nn.LayerNorm(d_model)

    def _check_tokens(self, tokens: torch.Tensor, name: str = "tokens") -> None:
        if not isinstance(tokens, torch.Tensor) or tokens.dtype != torch.long:
            raise TypeError(f"{name} must be a LongTensor of token ids, got "
                            f"{getattr(tokens, 'dtype', type(tokens).__name__)}.")
        if tokens.dim() != 2:
            raise ValueError(f"{name} has shape {tuple(tokens.shape)}; expected (batch, T). For "
                             f"one sequence use {name}.unsqueeze(0).")
        if tokens.shape[1] > self.max_len:
            raise ValueError(f"{name} has {tokens.shape[1]} positions, more than max_len="
                             f"{self.max_len}: cut the text into windows of at most {self.max_len} "
                             f"tokens, or build the model with a larger max_len.")
        if tokens.numel() and (tokens.min() < 0 or tokens.max() >= self.vocab_size):
            raise ValueError(f"{name} holds ids in [{tokens.min().item()}, {tokens.max().item()}], "
                             f"outside the vocabulary [0, {self.vocab_size}).")

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """x_t = √d · e(token_t) + P_t, (batch, T, d_model) (Vaswani et al. 2017, §3.4)."""
        self._check_tokens(tokens)
        x = self.embed(tokens) * math.sqrt(self.d_model)
        if self.positions is not None:
            x = x + self.positions[: tokens.shape[1]]
        return self.drop(x)

    def _setup_memory(self, mem_len: int, eval_mem_len: Optional[int]) -> None:
        check_range(mem_len, "mem_len", low=0, integer=True)
        if eval_mem_len is not None:
            check_range(eval_mem_len, "eval_mem_len", low=0, integer=True)
        if (mem_len or eval_mem_len) and not self.relative:
            raise ValueError(f"mem_len / eval_mem_len need positions=\"relative\": with absolute "
                             f"positions a remembered token would get the position of a token in "
                             f"the segment (got positions with mem_len={mem_len}, eval_mem_len="
                             f"{eval_mem_len}).")
        self.mem_len = mem_len
        self.eval_mem_len = mem_len if eval_mem_len is None else eval_mem_len

    def _keep(self) -> int:
        """How many tokens the memory keeps now: mem_len in training mode, eval_mem_len in eval."""
        return self.mem_len if self.training else self.eval_mem_len

    def _remember(self, memory: Optional[Memory], z: torch.Tensor, u: torch.Tensor) -> Optional[Memory]:
        """The last ``_keep()`` tokens of [memory; segment]: states z and injections u, detached."""
        keep = self._keep()
        if not keep:
            return None
        with torch.no_grad():
            if memory is not None:
                z, u = torch.cat([memory.z.to(z.dtype), z], 1), torch.cat([memory.u.to(u.dtype), u], 1)
            return Memory(z[:, -keep:].detach(), u[:, -keep:].detach())

    def _check_memory_use(self, memory) -> None:
        if memory is not None and not self.relative:
            raise ValueError("this model has no memory (positions is not \"relative\"); call it "
                             "without memory=.")

    def _body(self, x: torch.Tensor, memory=None) -> tuple:
        """(z, next_memory) for embedded tokens x and the memory of the tokens before them."""
        raise NotImplementedError

    def hidden(self, tokens: torch.Tensor, memory=None) -> torch.Tensor:
        """The last states before the output layer, LN(z*): (batch, T, d_model). Sets
        ``next_memory`` (module docstring)."""
        self._check_memory_use(memory)
        z, self.next_memory = self._body(self.embed_tokens(tokens), memory)
        return self.drop(self.norm(z))

    def forward(self, tokens: torch.Tensor, memory=None) -> torch.Tensor:
        """Logits (batch, T, vocab_size) for the next token at every position (with ``cutoffs``:
        log-probabilities, which are logits too); ``memory``: of the tokens before (module
        docstring)."""
        h = self.hidden(tokens, memory)
        if self.adaptive is None:
            return self.head(h)
        with _full_precision(h):
            flat = h.reshape(-1, self.d_model).to(self.adaptive.head.weight.dtype)
            return self.adaptive.log_prob(flat).view(*h.shape[:2], -1)

    def loss(self, tokens: torch.Tensor, targets: torch.Tensor, memory=None) -> torch.Tensor:
        """Mean negative log-likelihood of ``targets`` (batch, T) per token, in nats (``memory``:
        of the tokens before, see the module docstring)."""
        self._check_tokens(targets, "targets")
        if targets.shape != tokens.shape:
            raise ValueError(f"targets has shape {tuple(targets.shape)}, tokens "
                             f"{tuple(tokens.shape)}; they must match (targets: the next tokens).")
        if self.adaptive is None:
            return F.cross_entropy(self(tokens, memory).flatten(0, 1), targets.flatten())
        h = self.hidden(tokens, memory)
        with _full_precision(h):
            flat = h.reshape(-1, self.d_model).to(self.adaptive.head.weight.dtype)
            return self.adaptive(flat, targets.flatten()).loss

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, n_new: int, *, temperature: float = 1.0,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Sample ``n_new`` tokens after ``prompt`` (1, T0), each from softmax(logits / temperature)
        given the last ``max_len`` tokens (temperature 0: the most likely token). Runs in eval
        mode (no dropout) and restores the model's mode. Returns (1, T0 + n_new)."""
        self._check_tokens(prompt, "prompt")
        if prompt.shape[0] != 1 or prompt.shape[1] == 0:
            raise ValueError(f"prompt must have shape (1, T0) with T0 ≥ 1, got "
                             f"{tuple(prompt.shape)}.")
        check_range(n_new, "n_new", low=0, integer=True)
        check_range(temperature, "temperature", low=0)
        was_training = self.training
        self.eval()
        try:
            tokens = prompt
            for _ in range(n_new):
                logits = self(tokens[:, -self.max_len:])[:, -1].double()
                if temperature == 0:
                    nxt = logits.argmax(-1, keepdim=True)
                else:
                    probs = torch.softmax(logits / temperature, dim=-1)
                    nxt = torch.multinomial(probs.cpu(), 1, generator=generator).to(tokens.device)
                tokens = torch.cat([tokens, nxt], dim=1)
        finally:
            self.train(was_training)
        return tokens


def normal_init_(model: nn.Module, std: float) -> None:
    """locuslab's initialization (``--init normal --init_std``): every weight of a linear map and
    every embedding N(0, std²), biases 0, LayerNorm gains N(1, std²), Transformer-XL's global
    biases N(0, std²). A weight-normalized map W = g · V / ‖V‖ gets V ~ N(0, std²) and g = ‖V‖
    (so that W = V at the start, as weight norm's own initialization makes it)."""
    check_range(std, "init_std", low=0, low_open=True)
    parametrize = nn.utils.parametrize
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                if parametrize.is_parametrized(module, "weight"):
                    g, v = module.parametrizations.weight.original0, module.parametrizations.weight.original1
                    v.normal_(0.0, std)
                    g.copy_(torch.linalg.vector_norm(v, dim=tuple(range(1, v.dim())), keepdim=True))
                else:
                    module.weight.normal_(0.0, std)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.LayerNorm):
                module.weight.normal_(1.0, std)
                module.bias.zero_()
            elif isinstance(module, TransformerXLCell):
                module.r_w_bias.normal_(0.0, std)
                module.r_r_bias.normal_(0.0, std)


def _block(positions: str, d_model: int, n_heads: int, d_ff: int, dropout: float, norm: str,
           dropatt: float, weight_norm: bool) -> nn.Module:
    """The block: a ``TransformerXLCell`` for relative positions, else a ``TransformerCell`` (which
    has no attention dropout or weight norm)."""
    if positions == "relative":
        return TransformerXLCell(d_model, n_heads, d_ff, dropout=dropout, dropatt=dropatt,
                                 norm=norm, weight_norm=weight_norm)
    if dropatt or weight_norm:
        raise ValueError(f"dropatt and weight_norm are options of the Transformer-XL block: set "
                         f"positions=\"relative\" (got positions={positions!r}, dropatt={dropatt}, "
                         f"weight_norm={weight_norm}).")
    return TransformerCell(d_model, n_heads, d_ff, dropout=dropout, norm=norm)


class DEQTransformerLM(_LanguageModel):
    """The DEQ-Transformer language model: embedding → DEQ over a ``TransformerCell`` (or, with
    ``positions="relative"``, a ``TransformerXLCell`` with a memory) → LN → output.

    Args:
        vocab_size: number of token ids (the trainer passes the data's).
        d_model, n_heads, d_ff: the block's width, heads and feed-forward width.
        max_len: the longest segment (positions beyond it are an error).
        dropout: rate of the variational dropout inside the block and of plain dropout on the
            embedded input and on z* (both outside the solve).
        norm: ``"post"`` or ``"pre"`` LayerNorm placement (see the module docstring).
        positions: ``"learned"`` (a trained table), ``"sinusoidal"`` (Vaswani et al.) or
            ``"relative"`` (Transformer-XL's, in the block: the published DEQ-Transformer).
        tie_weights: share the input embedding with the output layer.
        cutoffs: word-level: cluster boundaries of the adaptive input and adaptive softmax
            (e.g. [20000, 40000, 200000] on WikiText-103); None: a full softmax.
        div_value: with cutoffs, cluster i has width d_model / div_value^i.
        mem_len, eval_mem_len: tokens of memory in training and in eval mode (relative positions
            only; eval_mem_len None: mem_len; 0: none).
        dropatt: attention-probability dropout (relative positions only).
        weight_norm: weight normalization on the block's maps (relative positions only).
        init_std: None: PyTorch's default initialization; a number: ``normal_init_``.
        deq: keyword arguments of ``deqlite.DEQ`` (solver, tol, max_iter, backward, ...).
    """

    def __init__(self, *, vocab_size: int = 256, d_model: int = 128, n_heads: int = 4,
                 d_ff: int = 512, max_len: int = 128, dropout: float = 0.0, norm: str = "post",
                 positions: str = "learned", tie_weights: bool = True,
                 cutoffs: Optional[Sequence[int]] = None, div_value: float = 4.0,
                 mem_len: int = 0, eval_mem_len: Optional[int] = None, dropatt: float = 0.0,
                 weight_norm: bool = False, init_std: Optional[float] = None,
                 deq: Optional[Mapping[str, Any]] = None):
        super().__init__(vocab_size=vocab_size, d_model=d_model, max_len=max_len, dropout=dropout,
                         positions=positions, tie_weights=tie_weights, cutoffs=cutoffs,
                         div_value=div_value)
        self._setup_memory(mem_len, eval_mem_len)
        self.cell = _block(positions, d_model, n_heads, d_ff, dropout, norm, dropatt, weight_norm)
        self.deq = DEQ.from_options(self.cell, deq)
        if init_std is not None:
            normal_init_(self, init_std)

    def _body(self, x: torch.Tensor, memory=None) -> tuple:
        if not self.relative:
            return self.deq(x), None
        z = self.deq(x, memory=memory)
        if not self._keep():
            return z, None
        with torch.no_grad():
            u = self.cell.injection(x)              # the segment's injection, as inject made it
        return z, self._remember(memory, z, u)


class TransformerLM(_LanguageModel):
    """The explicit baseline: ``n_layers`` untied blocks, z_k = f_k(z_{k−1}, x) from z_0 = 0, in
    place of the equilibrium. Same options as ``DEQTransformerLM`` (no ``deq``); with relative
    positions and ``mem_len`` it is Transformer-XL: the memory is one ``Memory`` per layer (the
    input states of that layer on the tokens before, and their injections)."""

    def __init__(self, *, vocab_size: int = 256, d_model: int = 128, n_heads: int = 4,
                 d_ff: int = 512, max_len: int = 128, n_layers: int = 4, dropout: float = 0.0,
                 norm: str = "post", positions: str = "learned", tie_weights: bool = True,
                 cutoffs: Optional[Sequence[int]] = None, div_value: float = 4.0,
                 mem_len: int = 0, eval_mem_len: Optional[int] = None, dropatt: float = 0.0,
                 weight_norm: bool = False, init_std: Optional[float] = None):
        super().__init__(vocab_size=vocab_size, d_model=d_model, max_len=max_len, dropout=dropout,
                         positions=positions, tie_weights=tie_weights, cutoffs=cutoffs,
                         div_value=div_value)
        check_range(n_layers, "n_layers", low=1, integer=True)
        self._setup_memory(mem_len, eval_mem_len)
        self.layers = nn.ModuleList(_block(positions, d_model, n_heads, d_ff, dropout, norm,
                                           dropatt, weight_norm) for _ in range(n_layers))
        if init_std is not None:
            normal_init_(self, init_std)

    def _body(self, x: torch.Tensor, memory=None) -> tuple:
        check_tensor(x, "x")
        if memory is not None and (not isinstance(memory, (list, tuple)) or len(memory) != len(self.layers)):
            raise ValueError(f"memory must be a list of {len(self.layers)} Memory pairs, one per "
                             f"layer (the model's next_memory of the previous segment).")
        z, new = None, []
        for i, layer in enumerate(self.layers):
            own = memory[i] if memory is not None else None
            injection = layer.inject(x, memory=own) if self.relative else layer.inject(x)
            z_in = layer.init_state(injection) if z is None else z
            z = layer(z_in, injection)
            if self.relative and self._keep():         # this layer's input states and injections
                t = z_in.shape[1]
                new.append(self._remember(own, z_in, injection[0][:, -t:]))
        return z, (new or None)
