"""FSDP2 (``fully_shard``): each rank owns a block of rows of every weight (DTensor Shard(0)) and
takes the same rows of the rank-averaged gradient.

FSDP2 itself would reduce-scatter each block's gradients after that block's backward and keep every
target's sharded ``.grad`` until the backward ends (there is no hook on a sharded gradient's
arrival): 1/world of the targets beside GoRA's float32 sums, in the parameter dtype. Instead a hook
on each target's unsharded weight (the one FSDP2 gathers for forward and backward) takes the
layer's gradient as autograd produces it, reduce-scatters it in float32 to this rank's rows, hands
them over and frees it, so FSDP2 finds nothing to reduce: one layer's gradient in flight at a time,
as under ZeRO-3. Letting FSDP2 accumulate the N steps instead would hold the same 1/world in the
parameter dtype (bfloat16 for a bfloat16 model: N additions each rounded to 8 significant bits) and
save nothing.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Iterable, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from gora_dist.comm.reduce import owned_mean
from gora_dist.engines.accumulator import gradients_only_for, target_weight_names
from gora_dist.engines.base import refuse_quantized, split_quantized
from gora_dist.engines.output_tap import OutputTaps
from gora_dist.method.shards import FlatShard
from gora_dist.model.devices import to_device
from gora_dist.model.loss import batch_loss
from gora_dist.model.quantized import BNB_4BIT, dequantized_weight, linear_shape, quantized_kind
from gora_dist.model.targets import find_target_modules, transformer_blocks


def default_shard_modules(model: nn.Module) -> list:
    """What to ``fully_shard`` before the root, one group each: the transformer blocks (modules whose
    class is in the model's ``_no_split_modules``, HF), then the input and output embeddings.

    Left to the root, the embeddings would stay gathered from the first forward to the end of the
    backward (FSDP2 never reshards the root after forward): at Llama-70B two 2.1 GB bf16 matrices
    whole on every rank through every step. Their own groups are gathered only while used, at the
    price of gathering the output head a second time for the backward. Tied, they share one group.
    """
    groups = list(transformer_blocks(model).values())
    inside_blocks = {id(module) for block in groups for module in block.modules()}  # BERT: embeddings are a block
    embeddings = [module for module in (_embedding(model, "get_input_embeddings"), _embedding(model, "get_output_embeddings"))
                  if isinstance(getattr(module, "weight", None), nn.Parameter) and id(module) not in inside_blocks]
    if len(embeddings) == 2 and embeddings[0].weight is embeddings[1].weight:
        groups.append(embeddings)
    else:
        groups.extend(embeddings)
    return groups


def _embedding(model: nn.Module, getter: str):
    try:
        return getattr(model, getter)()
    except (AttributeError, NotImplementedError):  # not a transformers model, or one without the getter
        return None


def mixed_precision(half: Optional[torch.dtype]):
    """FSDP2's policy for a run: compute in ``half`` (bf16/fp16) with float32 gradient reduction, or
    FSDP2's default (the parameters' own dtype) when ``half`` is None."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=half, reduce_dtype=torch.float32) if half else MixedPrecisionPolicy()


def fully_shard_model(model: nn.Module, groups: Optional[Iterable] = None, **fsdp_kwargs) -> None:
    """``fully_shard`` each group (default: :func:`default_shard_modules`), then the root, with the same
    arguments (``mesh``, ``mp_policy``, ``reshard_after_forward``)."""
    from torch.distributed.fsdp import fully_shard

    for group in (default_shard_modules(model) if groups is None else groups):
        fully_shard(group, **fsdp_kwargs)
    fully_shard(model, **fsdp_kwargs)


class FSDP2Engine:
    """Freezes everything but the target weights and, unless the model is already ``fully_shard``-ed
    (loaded sharded: see ``gora_dist.launcher.sharded_models``), shards each block and the root.

    mesh: a 1-D DeviceMesh (default: the sharded model's, else all ranks on this process's device
    type). shard_modules: the modules to shard one by one before the root (default: the model's
    transformer blocks). Other keyword arguments (``mp_policy``, ``reshard_after_forward``) go to
    ``fully_shard``. The model stays sharded afterwards: apply the plan to it and train it.
    Nothing here holds an unsharded weight, so each is freed as ``fully_shard`` replaces it.
    """

    def __init__(self, model: nn.Module, target_modules, *, mesh=None,
                 shard_modules: Optional[Iterable[nn.Module]] = None, **fsdp_kwargs) -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import FSDPModule

        self.model = model
        self.targets = find_target_modules(model, target_modules)
        dense, self._quantized = split_quantized(self.targets)
        refuse_quantized({n: m for n, m in self._quantized.items() if quantized_kind(m) != BNB_4BIT}, "FSDP2",
                         "an 8-bit layer keeps its scales beside the weight, which FSDP2 would not shard with it")
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(gradients_only_for(model, target_weight_names(dense)))
        if isinstance(model, FSDPModule):
            if shard_modules is not None or fsdp_kwargs:
                raise ValueError("the model is already fully_shard-ed: shard_modules and fully_shard arguments "
                                 "would be ignored; pass them when sharding it")
            self.mesh = mesh or next(p for p in model.parameters() if hasattr(p, "device_mesh")).device_mesh
        else:
            self.mesh = mesh or init_device_mesh(self.device.type, (dist.get_world_size(),))
            fully_shard_model(model, shard_modules, mesh=self.mesh, **fsdp_kwargs)
        self._shards = {name: self._row_shard(name, module.weight) for name, module in dense.items()}
        self._shards.update({name: self._tapped_rows(name, module) for name, module in self._quantized.items()})
        self._add = None
        self._missed = set()
        self._hooked = set()  # ids of unsharded weights that carry our hook (FSDP2 keeps one per weight)
        for name, module in dense.items():
            self._stack.callback(module.register_forward_pre_hook(self._watch(name)).remove)
        if self._quantized:
            self._stack.callback(OutputTaps(model, self._quantized, self._reduce_tapped).close)

    def _tapped_rows(self, name: str, module: nn.Module) -> FlatShard:
        """The rows of a quantised target's Ḡ this rank owns: the even row split FSDP2 gives a dense
        weight (the packed 4-bit buffer is sharded as bytes, unrelated to rows)."""
        rows, cols = linear_shape(module)
        if rows < self.mesh.size():
            raise ValueError(f"{name}: a quantised layer with {rows} output rows cannot give each of "
                             f"{self.mesh.size()} FSDP2 ranks a row of its gradient")
        return FlatShard.even_rows(self.mesh.get_local_rank(), self.mesh.size(), rows, cols)

    def _reduce_tapped(self, name: str, grad: torch.Tensor) -> None:
        """A quantised target's full local gᵀx: this rank's rows of the rank mean, at once."""
        shard = self._shards[name]
        chunk = -(-shard.rows // self.mesh.size())
        owned = owned_mean(grad, chunk * shard.cols, shard.numel, group=self.mesh.get_group())
        if self._add is not None:
            self._add(name, owned)

    def _watch(self, name: str):
        """Before the layer's forward, FSDP2 has put its unsharded weight in place: hook it once."""
        rows_per_rank = -(-self.targets[name].weight.shape[0] // self.mesh.size())

        def hook_unsharded_weight(module: nn.Module, _args) -> None:
            weight = module.weight
            if hasattr(weight, "device_mesh") or id(weight) in self._hooked or not weight.requires_grad:
                return  # still the sharded DTensor (not under FSDP2's forward), or already hooked
            self._hooked.add(id(weight))
            owned = self._shards[name].numel
            cols = weight.shape[1]

            def reduce_and_hand_over(param: torch.Tensor) -> None:
                grad, param.grad = param.grad, None
                if self._add is not None:
                    self._add(name, owned_mean(grad, rows_per_rank * cols, owned, group=self.mesh.get_group()))

            self._stack.callback(weight.register_post_accumulate_grad_hook(reduce_and_hand_over).remove)
            self._stack.callback(self._hooked.discard, id(weight))

        return hook_unsharded_weight

    def _row_shard(self, name: str, weight) -> FlatShard:
        from torch.distributed.tensor import Shard

        if tuple(weight.placements) != (Shard(0),):
            raise ValueError(f"{name}: FSDP2 placement {weight.placements} is not supported; GoRA needs Shard(0)")
        rows, cols = weight.shape
        expected = FlatShard.even_rows(self.mesh.get_local_rank(), self.mesh.size(), rows, cols)
        local_rows = weight.to_local().shape[0]
        if local_rows * cols != expected.numel:
            raise ValueError(f"{name}: local shard of {local_rows} rows does not follow FSDP2's even row split")
        return expected

    def shard(self, name: str) -> FlatShard:
        return self._shards[name]

    def local_weight(self, name: str) -> torch.Tensor:
        if name in self._quantized:  # the packed layer gathered (4 bits a weight), dequantised, this rank's rows
            module, shard = self._quantized[name], self._shards[name]
            packed = module.weight.full_tensor() if hasattr(module.weight, "device_mesh") else module.weight
            return dequantized_weight(module, packed).reshape(-1)[shard.start:shard.stop].clone()
        return self.targets[name].weight.to_local().detach().reshape(-1)

    def loss(self, batch, loss_fn, where: str) -> torch.Tensor:
        return batch_loss(self.model, to_device(batch, self.device), loss_fn, where)

    def backward(self, loss: torch.Tensor, add) -> None:
        self._add = add
        try:
            loss.backward()
        finally:
            self._add = None
        for name, module in self.targets.items():
            grad = module.weight.grad  # FSDP2 reduced it itself: our hook never saw the unsharded weight
            if grad is not None:
                if name not in self._missed:
                    self._missed.add(name)
                    warnings.warn(f"{name}: FSDP2 reduced this layer's gradient itself (its unsharded weight was not "
                                  "in place when the layer's forward began), so its shard is held until each backward "
                                  "ends; the plan is the same", stacklevel=2)
                add(name, grad.to_local().reshape(-1))
            module.weight.grad = None

    def close(self) -> None:
        self._stack.close()
