"""Training losses as pure functions."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from openft.models.render import IGNORE_INDEX
from openft.training import memory


def predicting_positions(labels: torch.Tensor) -> torch.Tensor:
    """``(B, T)`` bool: positions whose logits predict a labelled token (position t predicts label
    t+1; the last position predicts nothing). As transformers' boolean ``logits_to_keep`` it makes
    the model run its ``lm_head`` on these hidden states only, giving ``(n, V)`` logits in
    row-major order, the order :func:`shifted_targets` lists the targets in."""
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return keep


def shifted_targets(labels: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(targets, rows)`` for the ``(n, V)`` logits at ``keep``: the token each predicts, and its row."""
    targets = labels[:, 1:][keep[:, :-1]]
    rows = keep.nonzero()[:, 0]
    return targets, rows


def token_loss(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy of ``(n, V)`` logits (one per labelled token) against ``targets``, and the
    fraction predicted exactly (argmax); a loss of 0 (still differentiable) when ``n == 0``."""
    if targets.numel() == 0:
        return logits.sum() * 0.0, torch.zeros((), device=logits.device)
    loss = F.cross_entropy(logits.float(), targets)
    with torch.no_grad():
        accuracy = (logits.argmax(-1) == targets).float().mean()
    return loss, accuracy


def row_logprobs(
    logits: torch.Tensor, targets: torch.Tensor, rows: torch.Tensor, n_rows: int
) -> torch.Tensor:
    """Summed log-probability of each row's targets from ``(n, V)`` labelled-only logits: ``(n_rows,)``
    float32, 0 for a row without any. ``gather - logsumexp``, as in :func:`sequence_logprobs`."""
    flat = logits.float()
    token_logps = flat.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(flat, dim=-1)
    return torch.zeros(n_rows, device=logits.device, dtype=torch.float32).index_add(0, rows, token_logps)


def sft_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy over label tokens, and the fraction of them predicted exactly (argmax).

    ``logits`` (B, T, V) at position t predict token t+1, so labels are shifted left by one.
    Returns ``(loss, accuracy)``; with no label tokens the loss is 0 (still differentiable) and
    accuracy is 0.
    """
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    mask = shift_labels != IGNORE_INDEX
    n = mask.sum()
    if n == 0:
        return shift_logits.sum() * 0.0, torch.zeros((), device=logits.device)
    loss = (
        F.cross_entropy(
            shift_logits.reshape(-1, shift_logits.size(-1)),
            shift_labels.reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
        / n
    )
    with torch.no_grad():
        correct = (shift_logits.argmax(-1) == shift_labels) & mask
        accuracy = correct.sum().float() / n
    return loss, accuracy


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed log-probability of each row's label tokens: ``(B,)`` float32, 0 for a row without any.

    Same shift as :func:`sft_loss` (position t predicts token t+1). ``gather - logsumexp`` instead of
    a full ``log_softmax``: autograd then keeps only the logits, not a second (B, T, V) tensor.
    """
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    mask = shift_labels != IGNORE_INDEX
    picked = shift_logits.gather(-1, shift_labels.masked_fill(~mask, 0).unsqueeze(-1)).squeeze(-1)
    token_logps = picked - torch.logsumexp(shift_logits, dim=-1)
    return (token_logps * mask).sum(-1)


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sigmoid DPO (Rafailov et al. 2023) on summed response log-probs, one value per pair.

    The implicit reward of a reply is ``beta * (log pi(reply) - log ref(reply))``; the loss is
    ``-logsigmoid(reward_chosen - reward_rejected)`` averaged over pairs. Returns ``(loss,
    rewards_chosen, rewards_rejected)``; the rewards are detached, for metrics only.
    """
    rewards_chosen = beta * (policy_chosen - ref_chosen)
    rewards_rejected = beta * (policy_rejected - ref_rejected)
    loss = -F.logsigmoid(rewards_chosen - rewards_rejected).mean()
    return loss, rewards_chosen.detach(), rewards_rejected.detach()


def dpo_metrics(rewards_chosen: torch.Tensor, rewards_rejected: torch.Tensor) -> dict[str, float]:
    """Batch means of the implicit rewards, their margin, and the fraction of pairs whose chosen
    reply out-scores the rejected one (a tie counts as wrong: a fresh policy starts at 0)."""
    margin = rewards_chosen.float() - rewards_rejected.float()
    values = torch.stack(
        [
            rewards_chosen.float().mean(),
            rewards_rejected.float().mean(),
            margin.mean(),
            (margin > 0).float().mean(),
        ]
    ).tolist()  # one host sync for all four
    return dict(
        zip(("rewards_chosen", "rewards_rejected", "reward_margin", "reward_accuracy"), values, strict=True)
    )


# --- labelled-position losses without the (n, V) logits --------------------------------------
#
# ``Feeder.forward`` can hand back the hidden states that predict a labelled token, ``(n, H)``,
# with the ``lm_head`` that would turn them into logits (:class:`LogitHead`) instead of the logits
# themselves. With Qwen's 151,936-token vocabulary, 4k labelled tokens make 2.5 GB of fp32 logits
# plus as much again for their gradient; chunked, only one ``(chunk, V)`` block exists at a time,
# in the forward and in the backward (which recomputes each block's logits: one extra
# ``chunk x H x V`` matmul per block, traded for the memory).

LOSS_KERNELS = ("auto", "chunked", "plain", "liger")
"""``TrainConfig.loss_kernel`` values (see :func:`choose_loss_kernel`)."""
CHUNK_BYTES = memory.CHUNK_BYTES
"""fp32 logits per chunk: rows = this // (4 * V) (441 rows at V=151,936), at least 1 (the memory
planner's figure; tests shrink this one)."""
LIGER_MODEL_TYPES = frozenset(
    {
        "llama", "mistral", "mixtral", "qwen2", "qwen3", "qwen2_vl", "qwen2_5_vl", "qwen3_vl",
        "gemma", "gemma2", "gemma3", "gemma3_text", "phi3", "llava", "smolvlm", "olmo2",
    }
)  # fmt: skip
"""``config.model_type`` values with an ``apply_liger_kernel_to_*`` function in liger-kernel 0.8.5
(``liger_kernel.transformers.monkey_patch.MODEL_TYPE_TO_APPLY_LIGER_FN``) whose lm_head output we
know how to post-process (:func:`logit_transform`); the installed package is asked as well."""
PLAIN_HEAD_MODEL_TYPES = frozenset(
    {
        "llama", "mistral", "mixtral", "qwen2", "qwen3", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava",
        "phi3", "idefics3", "smolvlm", "olmo2", "mllama",
    }
)  # fmt: skip
"""Families whose causal-LM forward returns ``lm_head(hidden)`` unchanged (transformers 5.x)."""


class LogitHead(NamedTuple):
    """The vocabulary projection as the model applies it: ``softcap(scale * (h @ W.T + b))`` with
    ``softcap(z) = c * tanh(z / c)`` (Gemma 2/3's ``final_logit_softcapping``); ``scale`` is Cohere's
    ``logit_scale`` or 1 / Granite's ``logits_scaling``."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    scale: float = 1.0
    softcap: float | None = None
    dtype: torch.dtype | None = None
    """The matmul's dtype: autocast's when the model ran under it (as its own ``lm_head`` did),
    else None: the hidden states' own."""

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """fp32 ``(n, V)`` logits of ``hidden`` (the plain, unchunked computation)."""
        z = F.linear(hidden, self.weight, self.bias).float() * self.scale
        return z if self.softcap is None else torch.tanh(z / self.softcap) * self.softcap


def logit_transform(config: Any) -> tuple[float, float | None] | None:
    """``(scale, softcap)`` that ``config``'s family applies after its ``lm_head``, or None for a
    family not checked (its logits may be post-processed in ways the chunked loss would miss)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    model_type = getattr(config, "model_type", None)
    if model_type in ("gemma", "gemma2", "gemma3", "gemma3_text"):
        return 1.0, getattr(text, "final_logit_softcapping", None)
    if model_type in ("cohere", "cohere2"):
        return float(text.logit_scale), None
    if model_type == "granite":
        return 1.0 / float(text.logits_scaling), None
    if model_type in PLAIN_HEAD_MODEL_TYPES:
        return 1.0, None
    return None


def choose_loss_kernel(
    requested: str,
    *,
    device_type: str,
    liger_model_types: frozenset[str] | None,
    model_type: str,
    head_problem: str | None,
) -> tuple[str, str]:
    """``(kernel, why)``: ``"plain"`` (``(n, V)`` logits from the model), ``"chunked"``
    (:func:`chunked_logprobs`) or ``"liger"`` (Liger's fused linear cross-entropy for SFT, and its
    RMSNorm/RoPE/SwiGLU kernels patched into the model).

    ``liger_model_types``: the families the installed liger-kernel patches (None: not installed);
    ``head_problem``: why the lm_head cannot be taken out of the model (None: it can). ``auto``
    picks Liger on CUDA when installed and the family is supported, else chunked, else plain; an
    explicit choice that cannot be honoured raises ``ValueError`` saying why.
    """
    if requested not in LOSS_KERNELS:
        raise ValueError(f"loss_kernel must be one of {', '.join(LOSS_KERNELS)}, got {requested!r}")
    if requested == "plain":
        return "plain", "loss_kernel 'plain' asked for"
    if head_problem is not None:
        if requested != "auto":
            raise ValueError(
                f"loss_kernel {requested!r} cannot be used: {head_problem}; use 'plain' or 'auto'"
            )
        return "plain", head_problem
    liger_problem = None
    if device_type != "cuda":
        liger_problem = f"Liger kernels need CUDA (device is {device_type})"
    elif liger_model_types is None:
        liger_problem = "liger-kernel is not installed (pip install 'openft[gpu]')"
    elif model_type not in liger_model_types or model_type not in LIGER_MODEL_TYPES:
        liger_problem = f"no Liger kernels for {model_type} models"
    if requested == "liger":
        if liger_problem is not None:
            raise ValueError(f"loss_kernel 'liger' cannot be used: {liger_problem}; use 'auto' or 'chunked'")
        return "liger", "loss_kernel 'liger' asked for"
    if requested == "chunked":
        return "chunked", "loss_kernel 'chunked' asked for"
    if liger_problem is None:
        return "liger", f"Liger kernels on CUDA for {model_type}"
    return "chunked", liger_problem


def chunk_rows(vocab: int, budget: int | None = None) -> int:
    """Rows per chunk so that one chunk's fp32 logits take at most ``budget`` (default
    :data:`CHUNK_BYTES`) bytes."""
    return memory.chunk_rows(vocab, budget or CHUNK_BYTES)


class _ChunkedLogprobs(torch.autograd.Function):
    """Per-token ``log p(target)`` and argmax hits of ``head(hidden)``, one row chunk at a time.

    Forward keeps only ``(n,)`` log-sum-exps; backward recomputes each chunk's logits, turns them
    into ``g * (onehot - softmax)`` in place, and pushes that through the softcap, the scale and
    the matmul into the hidden states, the weight (when it trains) and the bias.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        scale: float,
        softcap: float | None,
        rows: int,
        dtype: torch.dtype,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n = hidden.shape[0]
        logps = torch.empty(n, device=hidden.device, dtype=torch.float32)
        lse = torch.empty_like(logps)
        hits = torch.empty(n, device=hidden.device, dtype=torch.bool)
        w, b = weight.to(dtype), None if bias is None else bias.to(dtype)
        for s in range(0, n, rows):
            z = _chunk_logits(hidden[s : s + rows], w, b, scale, softcap, dtype)[0]
            t = targets[s : s + rows]
            lse[s : s + rows] = torch.logsumexp(z, dim=-1)
            logps[s : s + rows] = z.gather(-1, t.unsqueeze(-1)).squeeze(-1) - lse[s : s + rows]
            hits[s : s + rows] = z.argmax(-1) == t
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.scale, ctx.softcap, ctx.rows, ctx.dtype = scale, softcap, rows, dtype
        ctx.mark_non_differentiable(hits)
        return logps, hits

    @staticmethod
    def backward(ctx: Any, grad_logps: torch.Tensor, _grad_hits: Any) -> tuple[Any, ...]:  # type: ignore[override]
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        dtype, rows = ctx.dtype, ctx.rows
        w, b = weight.to(dtype), None if bias is None else bias.to(dtype)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) if need_w else None
        grad_b = torch.zeros(bias.shape, device=bias.device, dtype=torch.float32) if need_b else None
        for s in range(0, hidden.shape[0], rows):
            h = hidden[s : s + rows]
            g = grad_logps[s : s + rows].float().unsqueeze(-1)
            z, tanh = _chunk_logits(h, w, b, ctx.scale, ctx.softcap, dtype)
            # d logp / dz = onehot(target) - softmax(z), scaled by the upstream gradient.
            dz = z.sub_(lse[s : s + rows].unsqueeze(-1)).exp_().mul_(-g)
            dz.scatter_add_(-1, targets[s : s + rows].unsqueeze(-1), g)
            if tanh is not None:
                dz.mul_(1 - tanh.square_())
            dz.mul_(ctx.scale)
            if need_b:
                grad_b += dz.sum(0)
            dz_c = dz.to(dtype)
            if need_h:
                grad_h[s : s + rows] = (dz_c @ w).to(hidden.dtype)
            if need_w and dtype == torch.float32:
                grad_w.addmm_(dz_c.t(), h.to(dtype))  # in place: no (V, H) temporary per chunk
            elif need_w:
                grad_w += dz_c.t() @ h.to(dtype)  # a low-precision product, summed in fp32
        return (
            grad_h,
            None if grad_w is None else grad_w.to(weight.dtype),
            None if grad_b is None else grad_b.to(bias.dtype),
            None, None, None, None, None,
        )  # fmt: skip


def _chunk_logits(
    h: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | None,
    scale: float,
    softcap: float | None,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fp32 logits of one chunk, and ``tanh(z / softcap)`` when softcapping (for the backward)."""
    with torch.autocast(h.device.type, enabled=False):
        z = F.linear(h.to(dtype), w, b).float()
    if scale != 1.0:
        z.mul_(scale)
    if softcap is None:
        return z, None
    tanh = torch.tanh(z.div_(softcap))
    return tanh * softcap, tanh


def chunked_logprobs(
    hidden: torch.Tensor, head: LogitHead, targets: torch.Tensor, rows: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log p(target) per token, argmax == target per token)``, ``(n,)`` float32 and bool, of the
    logits ``head.logits(hidden)`` without ever holding more than ``rows`` of them.

    The matmul runs in ``head.dtype`` (else ``hidden``'s); logits and softmax are fp32. ``rows``:
    default :func:`chunk_rows` of the vocabulary.
    """
    dtype = head.dtype or hidden.dtype
    rows = rows or chunk_rows(head.weight.shape[0])
    if hidden.shape[0] <= rows:  # one chunk: plain autograd holds no more, and skips the recompute
        bias = None if head.bias is None else head.bias.to(dtype)
        logits = LogitHead(head.weight.to(dtype), bias, head.scale, head.softcap).logits(hidden.to(dtype))
        logps = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
        return logps, (logits.detach().argmax(-1) == targets)
    return _ChunkedLogprobs.apply(
        hidden, head.weight, head.bias, targets, head.scale, head.softcap, rows, dtype
    )


class Scores(NamedTuple):
    """A batch at its labelled positions, as ``Feeder.forward`` returns it: ``(n, V)`` logits
    (``kernel == "plain"``), or the ``(n, H)`` hidden states and the head that makes them logits."""

    logits: torch.Tensor | None
    """``(n, V)``: one row per labelled token, in row-major order (plain kernel only)."""
    targets: torch.Tensor
    rows: torch.Tensor
    """The batch row of each labelled token (a packed batch has one row)."""
    n_rows: int
    hidden: torch.Tensor | None = None
    head: LogitHead | None = None
    kernel: str = "plain"


def labelled_loss(scores: Scores) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`token_loss` of ``scores`` with its kernel: mean cross-entropy and argmax accuracy."""
    if scores.kernel == "plain":
        assert scores.logits is not None
        return token_loss(scores.logits, scores.targets)
    hidden, head, targets = scores.hidden, scores.head, scores.targets
    assert hidden is not None and head is not None
    if targets.numel() == 0:
        return hidden.sum() * 0.0, torch.zeros((), device=hidden.device)
    if scores.kernel == "liger":
        return _liger_loss(hidden, head, targets)
    logps, hits = chunked_logprobs(hidden, head, targets)
    return -logps.mean(), hits.float().mean()


def labelled_logprobs(scores: Scores) -> tuple[torch.Tensor, torch.Tensor]:
    """``(summed log-prob per row (n_rows,) float32, argmax hit per labelled token (n,) bool)``:
    :func:`row_logprobs` with the scores' kernel (Liger's scores are chunked here: its
    per-token reduction is not what it was chosen for)."""
    if scores.kernel == "plain":
        assert scores.logits is not None
        with torch.no_grad():
            hits = scores.logits.argmax(-1) == scores.targets
        return row_logprobs(scores.logits, scores.targets, scores.rows, scores.n_rows), hits
    assert scores.hidden is not None and scores.head is not None
    logps, hits = chunked_logprobs(scores.hidden, scores.head, scores.targets)
    rows = torch.zeros(scores.n_rows, device=logps.device, dtype=torch.float32)
    return rows.index_add(0, scores.rows, logps), hits


def _liger_loss(
    hidden: torch.Tensor, head: LogitHead, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Liger's fused linear cross-entropy (Triton, CUDA only): mean loss and token accuracy.
    Inputs in the autocast dtype, as the model's own lm_head would take them; the weight's cast
    is differentiable, so fp32 master weights still get their gradient."""
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    dtype = head.dtype or hidden.dtype
    bias = None if head.bias is None else head.bias.to(dtype)
    out = liger_fused_linear_cross_entropy(
        hidden.to(dtype),
        head.weight.to(dtype),
        targets,
        bias,
        softcap=head.softcap,
        return_token_accuracy=True,
    )
    return out.loss, out.token_accuracy.detach()
