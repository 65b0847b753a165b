r"""Tensor parallelism (Megatron-LM, Shoeybi et al. 2019) for the decoder-only family, on PyTorch's DTensor.

``T`` ranks share every block; each holds ``1/T`` of its attention heads and of its FFN hidden units::

    attention:  [Q; K; V] = x W_in^T      W_in column-parallel: rank r computes its A/T query heads and G/T
                                          key/value heads (GQA groups stay whole: A/G query heads per KV head)
                y = Concat_r(heads_r) W_O^T = sum_r heads_r W_O,r^T      W_O row-parallel: one all-reduce
    FFN:        h = act(x W^T) * (x V^T)  W, V (SwiGLU gate and up) column-parallel: rank r has d_ff/T units
                y = h W_2^T = sum_r h_r W_2,r^T                          W_2 row-parallel: one all-reduce

so a block costs two all-reduces forward (and two backward, where the column-parallel inputs' gradients are
summed) and nothing else; embeddings, norms and the LM head stay whole on every rank. The layers are
``torch.distributed.tensor.parallel``'s ``ColwiseParallel`` / ``RowwiseParallel`` (``parallelize_module``):
the weights become DTensors sharded on the output (``Shard(0)``) or input (``Shard(1)``) dimension.

Fused projections. archlab stores ``W_in`` as one ``[A d_k + G d_k + G d_v, d]`` matrix (rows ``[Q; K; V]``)
and a gated FFN's ``[W; V]`` as one ``[2 d_ff, d]`` matrix. ``Shard(0)`` cuts a matrix into ``T`` contiguous
row blocks, which would give rank 0 only query rows. So before sharding the rows are regrouped rank by
rank, ``[Q_0; K_0; V_0; Q_1; K_1; V_1; ...]`` (and ``[W_0; V_0; W_1; V_1; ...]``): each rank's block is then the
fused layout of a layer with ``A/T`` heads, ``G/T`` KV heads (``d_ff/T`` units), and each attention module is
told its local head counts. :func:`full_state_dict` puts the rows back in place, so checkpoints and
comparisons see the model's own layout; :func:`load_full_state_dict` regroups a full state dict on the way in.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from archlab.errors import ConfigError
from archlab.nn.attention import MultiHeadAttention
from archlab.nn.feedforward import FeedForward, GatedFeedForward

#: what :func:`tensor_parallel` sets on the model: ``{parameter name: row order}`` of the regrouped fused rows
LAYOUT_ATTRIBUTE = "tensor_parallel_rows"


@dataclass(frozen=True)
class ParallelPlan:
    """The per-block plan: which linear layers are column- and which row-parallel (names within a block)."""

    colwise: tuple[str, ...]
    rowwise: tuple[str, ...]


def check_tensor_parallel(config, size: int, *, setting: str | None = None) -> None:
    """ConfigError unless ``size`` ranks can share a decoder of ``config``: they must divide ``A``, ``G`` and the
    FFN width, and the encoding must act per token or per head pair (ALiBi's per-head slopes are not split).
    ``setting``: the option ``size`` comes from (``train.tp_size``), named in the message; None: the number
    of processes."""
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ConfigError(f"tensor parallelism needs at least 1 rank, got {size!r} (the number of ranks, an int >= 1)")
    kv = config.n_kv_heads or config.n_heads
    source, advice = ("", "a number of processes") if setting is None else (f"{setting}={size}: ", f"a {setting}")
    for name, value in (("n_heads", config.n_heads), ("n_kv_heads", kv), ("d_ff", config.ffn_width)):
        if value % size:
            raise ConfigError(
                f"{source}tensor parallelism over {size} ranks splits {name}={value} by rank, but {size} does not "
                f"divide it; use {advice} that divides n_heads={config.n_heads}, n_kv_heads={kv} and "
                f"d_ff={config.ffn_width}"
            )
    if config.positional == "alibi":
        raise ConfigError("tensor parallelism supports positional encodings rope, learned, sinusoidal and none; "
                          "positional='alibi' adds per-head slopes that are not split by rank")  # fmt: skip
    if config.backend not in ("auto", "math", "sdpa"):
        raise ConfigError(f"tensor parallelism needs backend 'auto', 'math' or 'sdpa', got backend={config.backend!r}")


def _grouped_rows(blocks: list[int], size: int) -> Tensor:
    """Row order that turns ``[B_0; B_1; ...]`` (block ``i`` of ``blocks[i]`` rows) into rank-major order: rank r's
    slice of every block, one after the other: ``[B_0,r; B_1,r; ...]`` for r = 0..T-1. ``new = old[order]``."""
    starts = torch.tensor([0, *blocks]).cumsum(0)[:-1].tolist()
    order = []
    for r in range(size):
        for start, rows in zip(starts, blocks):
            share = rows // size
            order.extend(range(start + r * share, start + (r + 1) * share))
    return torch.tensor(order, dtype=torch.long)


def _plan(block: nn.Module) -> tuple[ParallelPlan, dict[str, list[int]]]:
    """The plan of one decoder block and the fused layers' row blocks (by name within the block)."""
    attn, ffn = block.attn, block.ffn
    if not isinstance(attn, MultiHeadAttention) or attn.backend_module is not None:
        raise ConfigError(f"tensor parallelism splits MultiHeadAttention by heads; got {type(attn).__name__}")
    fused = {"attn.in_proj": [attn.n_heads * attn.d_k, attn.n_kv_heads * attn.d_k, attn.n_kv_heads * attn.d_v]}
    if isinstance(ffn, GatedFeedForward):
        fused["ffn.w_in"] = [ffn.d_ff, ffn.d_ff]
        return ParallelPlan(("attn.in_proj", "ffn.w_in"), ("attn.out_proj", "ffn.w2")), fused
    if isinstance(ffn, FeedForward):
        return ParallelPlan(("attn.in_proj", "ffn.w1"), ("attn.out_proj", "ffn.w2")), fused
    raise ConfigError(f"tensor parallelism splits FeedForward / GatedFeedForward; got {type(ffn).__name__}")


def tensor_parallel(model: nn.Module, mesh) -> nn.Module:
    """Shard ``model``'s decoder blocks over the 1-D device ``mesh`` in place (module docstring); returns it.

    ``model``: a :class:`~archlab.models.decoder.DecoderLM` (GPT, Llama), built with the same weights on every
    rank (the same seed, or loaded from one file). ``mesh``: ``init_device_mesh("cpu", (T,))`` (gloo) or
    ``("cuda", (T,))``. Afterwards each rank's blocks hold ``1/T`` of the attention and FFN weights; inputs
    and outputs are whole tensors, the same on every rank. Build the optimiser after this call.
    """
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    from archlab.models.decoder import DecoderLM

    if not isinstance(model, DecoderLM):
        raise ConfigError(f"tensor_parallel shards a decoder-only LM (GPT, Llama); got {type(model).__name__}")
    from torch.distributed.device_mesh import DeviceMesh

    if not isinstance(mesh, DeviceMesh):
        raise ConfigError(f"tensor_parallel takes a 1-D DeviceMesh (init_device_mesh('cpu', (T,))), "
                          f"got {type(mesh).__name__}")  # fmt: skip
    if mesh.ndim != 1:
        raise ConfigError(f"tensor_parallel takes a 1-D device mesh, got {mesh.ndim} dimensions")
    if hasattr(model, LAYOUT_ATTRIBUTE):
        raise ConfigError("this model is already tensor-parallel")
    size = mesh.size()
    check_tensor_parallel(model.config, size)
    layout: dict[str, Tensor] = {}
    for i, block in enumerate(model.decoder.blocks):
        plan, fused = _plan(block)
        with torch.no_grad():
            for name, rows in fused.items():
                layer = block.get_submodule(name)
                order = _grouped_rows(rows, size)
                for kind in ("weight", "bias"):
                    p = getattr(layer, kind)
                    if p is not None:
                        p.copy_(p[order.to(p.device)])
                        layout[f"decoder.blocks.{i}.{name}.{kind}"] = order
        styles = {name: ColwiseParallel() for name in plan.colwise} | {name: RowwiseParallel() for name in plan.rowwise}
        parallelize_module(block, mesh, styles)
        block.attn.n_heads //= size  # the local head counts the attention's reshapes use
        block.attn.n_kv_heads //= size
        if isinstance(block.ffn, GatedFeedForward):
            block.ffn.d_ff //= size
    setattr(model, LAYOUT_ATTRIBUTE, layout)
    return model


def _whole(t: Tensor) -> Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def restore_rows(name: str, tensor: Tensor, layout: dict[str, Tensor]) -> Tensor:
    """A whole tensor of parameter ``name`` in the model's own row order (fused rows put back in place)."""
    order = layout.get(name)
    if order is None or tensor.ndim == 0:  # (an optimiser's 0-dim step count)
        return tensor
    out = torch.empty_like(tensor)
    out[order.to(tensor.device)] = tensor
    return out


def regroup_rows(name: str, tensor: Tensor, layout: dict[str, Tensor]) -> Tensor:
    """The inverse of :func:`restore_rows`: a tensor in the model's own order, regrouped rank by rank."""
    order = layout.get(name)
    return tensor if order is None or tensor.ndim == 0 else tensor[order.to(tensor.device)]


def full_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The whole state dict of a tensor-parallel model (every rank gets it; a collective), in the layout of
    the same model on one process. On a model that is not tensor-parallel: its own state dict."""
    layout = getattr(model, LAYOUT_ATTRIBUTE, {})
    return {name: restore_rows(name, _whole(t).detach(), layout) for name, t in model.state_dict().items()}


def full_gradients(model: nn.Module) -> dict[str, Tensor]:
    """``{name: whole gradient}`` in the one-process layout (a collective; parameters without a gradient left out)."""
    layout = getattr(model, LAYOUT_ATTRIBUTE, {})
    return {name: restore_rows(name, _whole(p.grad), layout) for name, p in model.named_parameters() if p.grad is not None}


def local_parameter_bytes(model: nn.Module) -> int:
    """Bytes of parameters this rank holds (its shards of DTensors, whole tensors otherwise; tied ones once)."""
    from torch.distributed.tensor import DTensor

    total = 0
    for p in model.parameters():
        local = p.to_local() if isinstance(p, DTensor) else p
        total += local.numel() * local.element_size()
    return total


def parameter_bytes_by_rank(model: nn.Module) -> list[tuple[int, int]]:
    """``[(bytes of all parameters, bytes of the decoder blocks' parameters)]``, one pair per rank in rank order, as
    each rank holds them (:func:`local_parameter_bytes`; the blocks are what tensor parallelism splits, embeddings,
    norms and the LM head stay whole). A collective (all-gather) in a process group; one pair without one."""
    import torch.distributed as dist

    mine = torch.tensor([local_parameter_bytes(model), local_parameter_bytes(model.decoder.blocks)])
    if not (dist.is_available() and dist.is_initialized()):
        return [tuple(mine.tolist())]
    every = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    return [tuple(t.tolist()) for t in every]
