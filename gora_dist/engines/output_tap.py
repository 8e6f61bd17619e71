"""A target layer's weight gradient taken from the layer's own backward, without a weight gradient.

A quantised layer's packed weight cannot require grad, and bitsandbytes' backward returns none. So a
forward hook passes the layer's output through an identity autograd function that saves the layer's
input x; in the backward it receives g = ∂L/∂y and hands gᵀ·x (``method/linear_gradient``) to the
engine: the same float32 (out, in) gradient a dense weight would get, one layer at a time.

Why an autograd function and not a module backward hook: a full backward hook breaks under
non-reentrant gradient checkpointing, and a hook closure on the output would keep every layer's x
alive until the backward; ``save_for_backward`` lets checkpointing drop and recompute x as it does
for the layer's own tensors. Nothing else in the model requires grad during GoRA's estimation, so a
tiny leaf ("anchor") is passed in to make the graph reach every tapped layer, and the input
embeddings' output is made to require grad (as transformers' ``enable_input_require_grads`` does)
for reentrant checkpointing, which runs a block's backward only when its input requires grad.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Dict

import torch
import torch.nn as nn

from gora_dist.method.linear_gradient import linear_weight_gradient

Deliver = Callable[[str, torch.Tensor], None]


class _OutputTap(torch.autograd.Function):
    """y ↦ y; in the backward, g ↦ g after handing gᵀ·x to ``receive``."""

    @staticmethod
    def forward(ctx, output, inputs, anchor, receive):
        ctx.save_for_backward(inputs)
        ctx.receive = receive
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad_output):
        (inputs,) = ctx.saved_tensors
        ctx.receive(linear_weight_gradient(grad_output, inputs))
        return grad_output, None, None, None


def _layer_input(args, kwargs):
    if args:
        return args[0]
    for key in ("x", "input", "hidden_states"):
        if key in kwargs:
            return kwargs[key]
    raise ValueError("a tapped layer was called without its input as the first argument")


class OutputTaps:
    """Taps on ``layers`` ({name: module}) that call ``deliver(name, (out, in) float32 gradient)`` as
    the backward passes each layer (once per call of the layer). ``close()`` removes every hook."""

    def __init__(self, model: nn.Module, layers: Dict[str, nn.Module], deliver: Deliver) -> None:
        self._stack = contextlib.ExitStack()
        device = next((p.device for p in model.parameters() if p.device.type != "meta"), None)
        self._anchor = torch.zeros((), device=device, requires_grad=True)
        for name, module in layers.items():
            hook = module.register_forward_hook(self._tap(name, deliver), with_kwargs=True)
            self._stack.callback(hook.remove)
        embeddings = _input_embeddings(model)
        if embeddings is not None and layers:
            self._stack.callback(embeddings.register_forward_hook(_require_grad).remove)

    def _tap(self, name: str, deliver: Deliver):
        def tap(_module, args, kwargs, output):
            if not torch.is_grad_enabled():  # reentrant checkpointing's first pass, evaluation
                return None
            return _OutputTap.apply(output, _layer_input(args, kwargs).detach(), self._anchor,
                                    lambda grad: deliver(name, grad))

        return tap

    def close(self) -> None:
        self._stack.close()


def _input_embeddings(model: nn.Module):
    try:
        return model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return None


def _require_grad(_module, _args, output):
    if torch.is_grad_enabled() and isinstance(output, torch.Tensor) and not output.requires_grad:
        output.requires_grad_(True)
