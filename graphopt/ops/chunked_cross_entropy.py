"""The head and the cross-entropy in chunks of tokens: the full logits never exist.

``chunked_linear_cross_entropy(hidden, weight, bias, labels, chunks=k)`` is
``cross_entropy(hidden @ weight.T + bias, labels)`` computed k row blocks at a time (the
recipe of Liger Kernel's fused linear cross-entropy and Unsloth's chunked loss): per
block, the logits, their part of the loss, the logits' gradient (softmax minus one-hot,
scaled as the reduction says), the hidden rows' gradient and the weight's gradient
(summed over blocks) are all computed in the forward, so no tensor as large as the
logits outlives a block. The backward only scales the saved gradients by the loss's
incoming gradient.

It is plain torch with an ``autograd.Function``: AOTAutograd traces it into aten ops, so
the planner sees every block's buffers and Inductor fuses each block's softmax into a
few kernels. Exact: the same arithmetic as eager's cross-entropy, block by block (the
weight's gradient is summed in float32 across blocks).
"""

from __future__ import annotations

import torch

REDUCTIONS = ("mean", "sum")


def chunked_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    *,
    chunks: int,
    ignore_index: int = -100,
    reduction: str = "mean",
    logits_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``cross_entropy(linear(hidden, weight, bias).to(logits_dtype).view(-1, V), labels.view(-1))``
    in `chunks` blocks of rows.

    `hidden` is ``(..., H)``, `labels` holds one class index per row of `hidden`.
    `logits_dtype` is what the logits are cast to before the loss (``float32`` where
    the model upcasts them; None keeps the matmul's dtype). Only ``mean`` and ``sum``
    reductions, no class weights, no label smoothing.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    rows = hidden.reshape(-1, hidden.shape[-1])
    flat_labels = labels.reshape(-1)
    if flat_labels.shape[0] != rows.shape[0]:
        raise ValueError(f"{flat_labels.shape[0]} labels for {rows.shape[0]} rows of hidden states")
    recording = torch.is_grad_enabled()
    needs = (
        recording and hidden.requires_grad,
        recording and weight.requires_grad,
        recording and bias is not None and bias.requires_grad,
    )
    settings = (max(1, min(int(chunks), rows.shape[0])), ignore_index, reduction, logits_dtype, needs)
    return _ChunkedLinearCrossEntropy.apply(rows, weight, bias, flat_labels, settings)


def chunk_bounds(rows: int, chunks: int) -> list[tuple[int, int]]:
    """`chunks` contiguous row ranges covering `rows`, sizes differing by at most one."""
    base, extra = divmod(rows, chunks)
    bounds, start = [], 0
    for index in range(chunks):
        stop = start + base + (index < extra)
        bounds.append((start, stop))
        start = stop
    return bounds


def _add_product(total: torch.Tensor | None, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """``total + left @ right`` in float32. In float32 one ``addmm``: the product never
    exists beside the sum, so a block holds two weight-sized buffers, not three."""
    if left.dtype != torch.float32:
        product = (left @ right).to(torch.float32)
        return product if total is None else total + product
    return left @ right if total is None else torch.addmm(total, left, right)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Forward: the loss and, where needed, the inputs' gradients for a loss gradient of 1.
    Backward: those gradients times the loss's gradient."""

    @staticmethod
    def forward(ctx, rows, weight, bias, labels, settings):  # type: ignore[override]
        chunks, ignore_index, reduction, logits_dtype, (grad_rows, grad_weight, grad_bias) = settings
        valid = labels != ignore_index
        # The mean divides by the number of labels not ignored, over all blocks.
        scale = valid.sum().to(torch.float32) if reduction == "mean" else None
        total = None
        hidden_gradients = []
        weight_gradient = bias_gradient = None  # float32 sums over blocks, from the first block on
        classes = torch.arange(weight.shape[0], device=rows.device)
        for start, stop in chunk_bounds(rows.shape[0], chunks):
            block = rows[start:stop]
            logits = torch.nn.functional.linear(block, weight, bias)
            if logits_dtype is not None:
                logits = logits.to(logits_dtype)
            block_valid = valid[start:stop]
            target = torch.where(block_valid, labels[start:stop], 0)
            maximum = logits.amax(dim=1, keepdim=True)
            shifted = logits - maximum
            log_sum = shifted.exp().sum(dim=1, keepdim=True).log()
            picked = shifted.gather(1, target.unsqueeze(1)).squeeze(1)
            losses = torch.where(block_valid, log_sum.squeeze(1) - picked, 0.0)
            block_total = losses.sum()
            total = block_total if total is None else total + block_total
            if not (grad_rows or grad_weight or grad_bias):
                continue
            # d loss / d logits: softmax minus one-hot on valid rows, divided by the count for a mean.
            weight_of_row = block_valid.to(torch.float32)
            if scale is not None:
                weight_of_row = weight_of_row / scale
            one_hot = classes.unsqueeze(0) == target.unsqueeze(1)
            gradient = (torch.exp(shifted - log_sum) - one_hot.to(logits.dtype)) * weight_of_row.unsqueeze(1).to(logits.dtype)
            gradient = gradient.to(weight.dtype)
            if grad_rows:
                hidden_gradients.append(gradient @ weight)
            if grad_weight:
                weight_gradient = _add_product(weight_gradient, gradient.t(), block)
            if grad_bias:
                part = gradient.sum(dim=0).to(torch.float32)
                bias_gradient = part if bias_gradient is None else bias_gradient + part
        loss = (total / scale).to(total.dtype) if scale is not None else total
        hidden_gradient = torch.cat(hidden_gradients) if grad_rows else None
        weight_gradient = weight_gradient.to(weight.dtype) if grad_weight else None
        bias_gradient = bias_gradient.to(bias.dtype) if grad_bias else None
        ctx.save_for_backward(hidden_gradient, weight_gradient, bias_gradient)
        return loss

    @staticmethod
    def backward(ctx, loss_gradient):  # type: ignore[override]
        hidden_gradient, weight_gradient, bias_gradient = ctx.saved_tensors

        def scaled(gradient):
            return None if gradient is None else gradient * loss_gradient.to(gradient.dtype)

        return scaled(hidden_gradient), scaled(weight_gradient), scaled(bias_gradient), None, None
