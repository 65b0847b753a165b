"""The same training loop on several processes (``torchrun --nproc_per_node=N``): DDP or FSDP2.

``torchrun`` starts N copies of the script and sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT`` in each; :func:`init_distributed` reads them and joins the process
group (``nccl`` on GPUs, ``gloo`` on CPUs). Without them everything here is a no-op on one process.

* ``ddp``: every rank holds the whole model; gradients are averaged across ranks in the backward pass.
* ``fsdp``: FSDP2, ``torch.distributed.fsdp.fully_shard`` on each block (``archlab.train.blocks``) and
  on the root: parameters, gradients and Adam's moments are sharded across ranks, gathered per block
  for its forward and backward.
* ``tp``: tensor parallelism (:func:`archlab.parallel.tensor_parallel`, decoder-only LMs): every rank holds
  ``1/N`` of each block's attention heads and FFN units and sees the whole batch (no data parallelism:
  :func:`data_parallel_env` is one process).
* ``fsdp+tp``: both (2D). The ``N`` ranks form a ``(dp, tp)`` device mesh of ``N / T`` rows of ``T`` consecutive
  ranks (``T = tp_size``, :func:`mesh_shape`): each block is tensor-parallel over the ``tp`` ranks of its row,
  then FSDP2-sharded over the ``dp`` ranks of its column, so a rank holds ``1/N`` of the block weights
  (embeddings, norms and the LM head: ``1/(N/T)``, FSDP's share). The data is split over ``dp`` only: the ``T``
  ranks of a row read the same micro-batches (:func:`data_parallel_env`, with the ``dp`` process group for the
  loop's sums and gathers).

Each rank reads its own shard of the data (the batch source's ``rank`` / ``world_size``); the global
batch is the union of the ranks' micro-batches. Only rank 0 writes checkpoints and logs. Model and
optimiser state go through ``torch.distributed.checkpoint.state_dict`` as *full* state dicts keyed by
parameter name, so a checkpoint is the same whatever wrote it (1 process, DDP or FSDP).

Several machines: run the same ``torchrun`` on each with ``--nnodes=M --node_rank=i
--rdzv_endpoint=HOST:PORT`` (or ``--master_addr/--master_port``); resuming needs the checkpoint folder
visible to every rank (a shared file system).
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from archlab.errors import ConfigError
from archlab.train.blocks import find_blocks
from archlab.train.config import TENSOR_PARALLEL

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands: ``rank`` of ``world_size`` processes, ``local_rank`` on its machine."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    #: the process group of these ``world_size`` ranks for the collectives below; None: every process
    group: Any = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def detect() -> DistEnv:
    """The :class:`DistEnv` torchrun's environment variables describe (one process when they are absent)."""
    if "WORLD_SIZE" not in os.environ:
        return DistEnv()
    values = {}
    for name in TORCHRUN_VARIABLES:
        text = os.environ.get(name, "0")
        if not text.isdigit():
            raise ConfigError(f"environment variable {name}={text!r} must be a non-negative integer (torchrun sets it)")
        values[name] = int(text)
    env = DistEnv(values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"])
    if env.world_size < 1 or env.rank >= env.world_size:
        raise ConfigError(f"RANK={env.rank} must be in [0, WORLD_SIZE={env.world_size})")
    return env


def mesh_shape(env: DistEnv, parallel: str, tp_size: int | None = None) -> tuple[int, ...] | None:
    """The device mesh ``parallel`` arranges ``env``'s ranks in: ``(N,)`` under ``tp``, ``(N / tp_size, tp_size)``
    (named ``dp``, ``tp``) under ``fsdp+tp``; None under ``ddp`` / ``fsdp`` or on one process. ConfigError when
    ``tp_size`` (``TrainConfig.tp_group_size``) does not divide the world size."""
    if not env.distributed or parallel not in TENSOR_PARALLEL:
        return None
    if parallel == "tp":
        return (env.world_size,)
    if tp_size is None or tp_size < 1 or env.world_size % tp_size:
        raise ConfigError(
            f"train.tp_size={tp_size!r} must divide the number of processes, WORLD_SIZE={env.world_size}: "
            f"parallel='fsdp+tp' arranges them as a (dp, tp) mesh of WORLD_SIZE / tp_size rows of tp_size ranks"
        )
    return (env.world_size // tp_size, tp_size)


def device_mesh(env: DistEnv, parallel: str, device: torch.device, tp_size: int | None = None):
    """The :class:`~torch.distributed.device_mesh.DeviceMesh` of :func:`mesh_shape` (a collective: every rank
    builds it, in the same order), or None. Rank ``r`` sits at ``(r // tp_size, r % tp_size)`` of a 2D mesh."""
    shape = mesh_shape(env, parallel, tp_size)
    if shape is None:
        return None
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, shape, mesh_dim_names=("tp",) if len(shape) == 1 else ("dp", "tp"))


def data_parallel_env(env: DistEnv, parallel: str, tp_size: int | None = None, mesh=None) -> DistEnv:
    """The ranks that split the data: all of them under ``ddp`` / ``fsdp``; under ``tp`` one (every rank reads
    the whole batch, seeds alike, and no loss or count is summed over the ranks); under ``fsdp+tp`` the ``dp``
    column of this rank's mesh position (rank ``r // tp_size`` of ``N / tp_size``: the ranks of one ``tp`` row
    read alike). ``mesh``: :func:`device_mesh`'s, whose ``dp`` process group the returned env then carries
    (without it, rank and size alone, enough to shard a data source)."""
    if not env.distributed:
        return env
    if parallel == "tp":
        return DistEnv()
    if parallel == "fsdp+tp":
        dp, tp = mesh_shape(env, parallel, tp_size)
        group = None if mesh is None else mesh["dp"].get_group()
        return DistEnv(env.rank // tp, dp, env.local_rank, group)
    return env


def init_distributed(device: str = "auto") -> DistEnv:
    """Join the process group torchrun prepared (once): ``nccl`` when ``device`` (``auto | cpu | cuda``)
    resolves to CUDA, ``gloo`` otherwise. Call it before building the batch source, to shard it by rank."""
    env = detect()
    missing = [n for n in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(n)]
    if env.distributed and missing and not dist.is_initialized():  # WORLD_SIZE set by hand, not by torchrun
        are, n = ("is" if len(missing) == 1 else "are"), env.world_size
        raise ConfigError(f"WORLD_SIZE={n} asks for {n} processes, but {' and '.join(missing)} {are} not set: start "
                          f"them with torchrun --nproc_per_node={n} (it sets these variables), or unset WORLD_SIZE "
                          "to train on one process")  # fmt: skip
    if env.distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if device_for(device, env).type == "cuda" else "gloo")
    return env


def device_for(kind: str, env: DistEnv) -> torch.device:
    """``auto | cpu | cuda`` -> this rank's device (``cuda:LOCAL_RANK`` on GPUs)."""
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device='cuda' but torch sees no CUDA GPU; use device='cpu' or 'auto'")
        return torch.device("cuda", env.local_rank)
    return torch.device("cpu")


# -- wrapping ---------------------------------------------------------------------------------------------


class MethodAsForward(nn.Module):
    """``forward(*args, **kwargs) = model.<method>(*args, **kwargs)``: a call of another method of ``model``
    (ELMo's ``compute_loss``) as a ``forward``, the one call DDP and ``torch.compile`` see.

    Its one child is ``model`` itself, so the parameters are the model's (named ``model.<name>`` here).
    """

    def __init__(self, model: nn.Module, method: str):
        super().__init__()
        if not callable(getattr(model, method, None)):
            raise ConfigError(f"training calls model.{method}(...); {type(model).__name__} has no method {method!r}")
        self.model, self.method = model, method

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.model, self.method)(*args, **kwargs)


def wrap(
    model: nn.Module, env: DistEnv, parallel: str, device: torch.device, *, find_unused: bool = False,
    method: str | None = None, mesh=None,
) -> nn.Module:  # fmt: skip
    """The module to run forward on: ``model`` itself on one process, DDP around it, or (``fsdp``, ``tp``,
    ``fsdp+tp``) ``model`` sharded in place. Build the optimiser *after* this call: FSDP and TP replace the
    parameters by shards. ``mesh``: :func:`device_mesh`'s for ``tp`` (built here when None) and ``fsdp+tp``.

    ``find_unused``: some parameters may get no gradient in a step (BERT's NSP head when the batches
    carry no ``next_sentence_label``, ELMo's scalar mix); DDP must then look for them after each backward.

    ``method``: training calls ``model.<method>`` instead of ``forward``; the module returned is then a
    :class:`MethodAsForward` around ``model`` (DDP wraps it; under FSDP the method gathers the shards
    itself, ``register_fsdp_forward_method``, so evaluation may call it on ``model`` too).

    FSDP2 shards each parameter along its first dimension; a 0-dim parameter (ELMo's ``mix.gamma``) stays
    whole on every rank, as under DDP, and its gradient is averaged over the ranks when it is computed
    (every rank must then use it in every micro-batch, or none must).
    """
    module = model if method is None else MethodAsForward(model, method)
    if not env.distributed:
        return module
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=device_ids, find_unused_parameters=find_unused)
    if parallel in TENSOR_PARALLEL:
        from archlab.parallel import tensor_parallel

        if method is not None:
            raise ConfigError(f"parallel={parallel!r} shards decoder-only LMs trained on task 'lm'; "
                              f"this task calls model.{method}")  # fmt: skip
        if parallel == "tp":
            return tensor_parallel(model, mesh if mesh is not None else device_mesh(env, parallel, device))
        if mesh is None or mesh.ndim != 2:
            raise ConfigError("parallel='fsdp+tp' needs the 2D (dp, tp) mesh of device_mesh(env, 'fsdp+tp', ...)")
        _broadcast_from_rank_0(model)  # whole tensors, before they become shards
        tensor_parallel(model, mesh["tp"])
        _fully_shard(model, mesh["dp"])
        return model
    if parallel == "fsdp":
        _broadcast_from_rank_0(model)
        _fully_shard(model)  # in place: `module` holds the sharded model
        if method is not None:
            from torch.distributed.fsdp import register_fsdp_forward_method

            register_fsdp_forward_method(model, method)
            # The method's own call of `model(...)` is a forward inside it; FSDP warns when that returns a view
            # (ELMo's LSTM outputs) since an in-place op on it would drop its pre-backward hook. The root keeps
            # its parameters gathered until the backward, and the method's output carries that hook: no harm.
            root = type(model).__name__
            warnings.filterwarnings("ignore", rf"FSDP2-wrapped module \({root}\) returned a view tensor", UserWarning)
        return module
    raise ConfigError(f"parallel={parallel!r} must be 'ddp', 'fsdp', 'tp' or 'fsdp+tp'")


def _broadcast_from_rank_0(model: nn.Module) -> None:
    """Every rank starts from rank 0's weights, as DDP does."""
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            dist.broadcast(tensor, src=0)


def _fully_shard(model: nn.Module, mesh=None) -> None:
    """FSDP2 in place over ``mesh`` (1-D; None: every rank): each block, then the root; 0-dim parameters
    replicated, their gradients averaged over the mesh's ranks (see :func:`wrap`)."""
    from torch.distributed.fsdp import fully_shard

    group = None if mesh is None else mesh.get_group()
    scalars = {p for p in model.parameters() if p.ndim == 0}
    for p in scalars:
        p.register_hook(functools.partial(_average_over_ranks, group=group))
    for block in find_blocks(model):
        fully_shard(block, mesh=mesh, ignored_params=scalars)
    fully_shard(model, mesh=mesh, ignored_params=scalars)


def _average_over_ranks(grad: Tensor, group=None) -> Tensor:
    dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=group)
    return grad / dist.get_world_size(group)


def no_sync(module: nn.Module, env: DistEnv, sync: bool):
    """Context for one micro-batch's backward: gradients are synchronised across ranks only when ``sync``
    (the last micro-batch of a step); the others accumulate locally."""
    if not env.distributed or sync:
        return contextlib.nullcontext()
    if isinstance(module, MethodAsForward):  # FSDP: around the sharded model
        module = module.model
    if hasattr(module, "no_sync"):  # DDP
        return module.no_sync()
    if hasattr(module, "set_requires_gradient_sync"):  # FSDP2

        @contextlib.contextmanager
        def unsynced():
            module.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                module.set_requires_gradient_sync(True)

        return unsynced()
    return contextlib.nullcontext()


# -- collectives ------------------------------------------------------------------------------------------


def all_reduce_sum(tensor: Tensor, env: DistEnv) -> Tensor:
    """Sum of ``tensor`` over the ranks (in place; the tensor itself on one process)."""
    if env.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=env.group)
    return tensor


def gather_objects(obj: Any, env: DistEnv) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (JSON-able values travel between our own processes)."""
    if not env.distributed:
        return [obj]
    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj, group=env.group)
    return out


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier(group=env.group)


def leave_process_group() -> None:
    """Leave the default process group together: a barrier, then ``dist.destroy_process_group()``, so no rank tears
    its connections down while another still works (rank 0 writing its results after the last collective). Twice a
    2-rank gloo run under torchrun aborted a rank ("terminate called without an active exception";
    tests/train/test_tensor_parallel.py on 2026-12-04, the megatron-sharding lab on 2026-12-05), both in workers where
    the other ranks went straight from the last collective to ``destroy_process_group`` while rank 0 wrote; the
    barrier closes that window. Not proven to be the cause: neither abort reproduced. A no-op where no group is
    initialized."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def clip_grad_norm(parameters: list[nn.Parameter], max_norm: float, *, tensor_parallel: bool = False) -> float:
    """``torch.nn.utils.clip_grad_norm_`` (global L2 norm, returned before clipping). ``tensor_parallel`` (``tp``,
    ``fsdp+tp``): the gradients are DTensors on different meshes (the ``tp`` axis, the 2D mesh, FSDP's ``dp``
    axis) beside whole tensors, which torch's foreach norm refuses to mix. Each process then adds up its
    :func:`_square_share` of every gradient and one all-reduce over all processes sums them: the same norm on
    every rank (each rank scales its own pieces by it), one collective per step."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not tensor_parallel:
        return float(torch.nn.utils.clip_grad_norm_(parameters, max_norm))
    device = grads[0].device if grads else torch.device("cpu")
    total = torch.zeros((), dtype=torch.float64, device=device)
    for g in grads:
        total += _square_share(g)
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    norm = float(total.sqrt())
    scale = max_norm / (norm + 1e-6)
    if scale < 1.0:
        for g in grads:
            g.detach().mul_(scale)
    return norm


def _square_share(grad: Tensor) -> Tensor:
    """This process's share of ``||grad||^2`` in a sum over all ``N`` processes (each holding one piece of every
    gradient, as under ``tp`` / ``fsdp+tp``): the squares of its piece times ``pieces / N``, where ``pieces`` is
    the number of distinct pieces (the product of the mesh sizes along which the DTensor is sharded; 1 for a
    whole tensor), so the ``N / pieces`` processes holding copies of one piece count it once between them."""
    from torch.distributed.tensor import DTensor, Replicate

    pieces, local = 1, grad
    if isinstance(grad, DTensor):
        if any(p.is_partial() for p in grad.placements):  # pending sums: settle them first
            grad = grad.redistribute(grad.device_mesh, [Replicate() if p.is_partial() else p for p in grad.placements])
        for dim, placement in enumerate(grad.placements):
            if not placement.is_replicate():  # Shard, or FSDP's _StridedShard over a tensor-parallel Shard
                pieces *= grad.device_mesh.size(dim)
        local = grad.to_local()
    return local.detach().double().pow(2).sum() * (pieces / dist.get_world_size())


# -- full state dicts (whatever the wrapping) ---------------------------------------------------------------


def _state_dicts():
    """``torch.distributed.checkpoint.state_dict``, imported when a checkpoint is made or read: it imports DTensor,
    0.6 s of every archlab start on 2 cores that trains nothing."""
    from torch.distributed.checkpoint import state_dict

    return state_dict


def _options(env: DistEnv | None = None, **kw):
    """Full (unsharded) state dicts, offloaded to the CPU where ``env`` is distributed."""
    return _state_dicts().StateDictOptions(full_state_dict=True, cpu_offload=env is not None and env.distributed, **kw)


def _rows(model: nn.Module, state: dict[str, Tensor], forward: bool) -> dict[str, Tensor]:
    """A tensor-parallel model's fused rows (:mod:`archlab.parallel`) put back in place (``forward=False``) or
    regrouped by rank (``forward=True``) in a full state dict; other models' dicts are returned as they are."""
    from archlab.parallel import LAYOUT_ATTRIBUTE, regroup_rows, restore_rows

    layout = getattr(model, LAYOUT_ATTRIBUTE, None)
    if not layout:
        return state
    move = regroup_rows if forward else restore_rows
    return {name: move(name, t, layout) if isinstance(t, Tensor) else t for name, t in state.items()}


def full_model_state(model: nn.Module, env: DistEnv) -> dict[str, Tensor]:
    """The whole model's state dict by parameter name (on rank 0; ``{}`` on the others when distributed)."""
    return _rows(model, _state_dicts().get_model_state_dict(model, options=_options(env)), forward=False)


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, env: DistEnv) -> dict[str, Any]:
    """The optimiser's state dict keyed by parameter name (on rank 0; ``{}`` on the others when distributed)."""
    state = _state_dicts().get_optimizer_state_dict(model, optimizer, options=_options(env))
    return _optimizer_rows(model, state, forward=False)


def _optimizer_rows(model: nn.Module, state: dict[str, Any], forward: bool) -> dict[str, Any]:
    """:func:`_rows` on each parameter's optimiser state (Adam's moments; the 0-dim ``step`` is left alone)."""
    if "state" not in state:
        return state
    moved = {name: {k: _rows(model, {name: v}, forward)[name] for k, v in s.items()} for name, s in state["state"].items()}
    return {**state, "state": moved}


def load_full_model_state(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Load a full state dict (every rank passes the whole of it); FSDP and TP keep each rank's shard."""
    _state_dicts().set_model_state_dict(model, _rows(model, state, forward=True), options=_options())


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a full optimiser state dict (by parameter name). A parameter that has had no gradient yet (ELMo's
    scalar mix while its biLM trains) comes back without state, as AdamW left it: ``strict=False`` lets it
    be absent, and the zero state torch first gives every parameter (a step with zero gradients, ``step``
    counted) is removed again."""
    state = _optimizer_rows(model, state, forward=True)
    _state_dicts().set_optimizer_state_dict(model, optimizer, state, options=_options(strict=False))
    for name, param in model.named_parameters():
        if name not in state["state"]:
            optimizer.state.pop(param, None)
