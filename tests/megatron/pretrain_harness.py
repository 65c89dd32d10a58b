"""Megatron-LM's own training loop (`megatron.training.pretrain`, megatron-core 0.19) on CPU over gloo.

Used by the tests inside their spawned ranks only: nothing here runs, or is patched, in the
pytest process. Each stand-in replaces one CUDA-only spot and names the Megatron file it stands in
for; everything else (argument parsing and validation, initialisation, DDP, the optimizer, the
pipeline schedules, `finalize_model_grads`, logging, checkpointing) is Megatron's.

    install_stand_ins()                 once per rank
    run_pretrain(argv, ...)             one pretrain() call, through examples/pretrain_gpt_tokweight.py;
                                        returns every logged loss dict and this rank's parameters
                                        after each optimizer step (by global name)
    reset_megatron_globals()            between two pretrain() calls in one process
    deterministic_parameters(model)     the same full weights whatever the TP/PP layout
"""
import contextlib
import functools
import importlib.util
import sys
import zlib
from pathlib import Path

import torch

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "pretrain_gpt_tokweight.py"


class HostStream:
    """`torch.cuda` streams on the host: nothing to wait for or synchronise."""

    def wait_event(self, event):
        pass

    def wait_stream(self, stream):
        pass

    def synchronize(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class HostEvent:
    """`torch.cuda.Event` on the host (Megatron's timers record and query them)."""

    def __init__(self, *args, **kwargs):
        pass

    def record(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def wait(self, *args, **kwargs):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


class CudaToCpu(torch.overrides.TorchFunctionMode):
    """Tensors Megatron allocates on the current CUDA device land on the CPU, and `.cuda()` keeps
    a tensor where it is: `schedules.py` (total_num_tokens), `training.py` and `utils.py` (loss and
    report buffers), `model.cuda(torch.cuda.current_device())` in `training.py` get_model."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.cuda:
            return args[0]
        kwargs = dict(kwargs or {})
        device = kwargs.get("device")
        if device is not None and ("cuda" in str(device) or isinstance(device, int)):
            kwargs["device"] = "cpu"
        return func(*args, **kwargs)


def python311_compat():
    """megatron/training of 0.19 imports `typing.override` (3.12); `typing_extensions` has it."""
    import typing

    if not hasattr(typing, "override"):
        import typing_extensions

        typing.override = typing_extensions.override


def install_stand_ins():
    """Replace the CUDA-only spots pretrain() reaches on a CPU-only machine (this process only)."""
    python311_compat()
    import megatron.core.datasets.utils as dataset_utils
    import megatron.training.initialize as initialize
    import megatron.training.training as training
    from megatron.core import parallel_state

    # tensor_parallel/random.py, distributed/param_and_grad_buffer.py, p2p_communication.py and
    # training.py allocate on, or read RNG state of, the current CUDA device
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *args, **kwargs: None
    torch.cuda.empty_cache = lambda: None
    torch.cuda.current_stream = lambda *args, **kwargs: HostStream()
    torch.cuda.Stream = lambda *args, **kwargs: HostStream()
    torch.cuda.stream = lambda stream: contextlib.nullcontext()
    torch.cuda.Event = HostEvent
    # training.py's memory report (theoretical_memory_usage.py, report_memory in utils.py)
    for name in ("memory_allocated", "max_memory_allocated", "memory_reserved", "max_memory_reserved"):
        setattr(torch.cuda, name, lambda *args, **kwargs: 0)
    torch.cuda.reset_peak_memory_stats = lambda *args, **kwargs: None
    # checkpointing.py saves and restores the CUDA RNG next to the CPU one
    torch.cuda.get_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    torch.cuda.set_rng_state = lambda *args, **kwargs: None
    torch.cuda.manual_seed = lambda *args, **kwargs: None
    torch.cuda.manual_seed_all = lambda *args, **kwargs: None
    # training/initialize.py: initialize_megatron asserts CUDA unless told it may run without it
    training.initialize_megatron = functools.partial(initialize.initialize_megatron, allow_no_cuda=True)
    # training/initialize.py: _initialize_distributed sets up the model-parallel groups only when
    # it sees a CUDA device; here they are set up right after, with the same arguments
    distributed = initialize._initialize_distributed

    def distributed_then_model_parallel(*args, **kwargs):
        distributed(*args, **kwargs)
        from megatron.training import get_args

        a = get_args()
        if not parallel_state.model_parallel_is_initialized():
            parallel_state.initialize_model_parallel(
                a.tensor_model_parallel_size, a.pipeline_model_parallel_size,
                context_parallel_size=a.context_parallel_size)

    initialize._initialize_distributed = distributed_then_model_parallel
    # training/initialize.py: the nvFuser / TorchScript fusion settings are CUDA-only
    initialize.set_jit_fusion_options = lambda *args, **kwargs: None
    # training/arguments.py: validate_args asks the CUDA device's architecture when TP or CP > 1
    # (CUDA_DEVICE_MAX_CONNECTIONS advice); 0 reads as "before Blackwell", advice only
    import megatron.training.arguments as arguments

    arguments.get_device_arch_version = lambda: 0
    # datasets/utils.py: the wheel ships the compiled helpers but no Makefile to rebuild them
    dataset_utils.compile_helpers = lambda: None


def reset_megatron_globals():
    """What one pretrain() call leaves behind, so that the next one starts fresh."""
    from megatron.core import parallel_state
    from megatron.core.num_microbatches_calculator import (
        destroy_num_microbatches_calculator,
    )
    from megatron.core.rerun_state_machine import destroy_rerun_state_machine
    from megatron.training import global_vars

    global_vars.destroy_global_vars()
    parallel_state.destroy_model_parallel()
    destroy_num_microbatches_calculator()
    destroy_rerun_state_machine()


def global_name(model, name: str) -> str:
    """A parameter's name in the single-process model: layer indices are global (this PP stage's
    layer i is `layer_number - 1`); the last stage's tied output weight is the word embedding."""
    if name.startswith("output_layer.weight") and getattr(model, "share_embeddings_and_output_weights", False):
        return "embedding.word_embeddings.weight"
    parts = name.split(".")
    if parts[:2] == ["decoder", "layers"]:
        parts[2] = str(model.decoder.layers[int(parts[2])].layer_number - 1)
    return ".".join(parts)


def full_value(name: str, shape) -> torch.Tensor:
    """The full (unsharded) value of parameter `name`: seeded by its name alone."""
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    value = torch.randn(tuple(shape), generator=g, dtype=torch.float32) * 0.05
    if "norm" in name and name.endswith("weight"):
        value += 1.0
    return value


def _shard(param, full: torch.Tensor) -> torch.Tensor:
    """This TP rank's slice of `full` (Megatron's layout: a contiguous chunk along partition_dim)."""
    from megatron.core import parallel_state

    if not getattr(param, "tensor_model_parallel", False):
        return full
    dim, size = param.partition_dim, param.shape[param.partition_dim]
    rank = parallel_state.get_tensor_model_parallel_rank()
    return full.narrow(dim, rank * size, size)


def full_shape(param):
    from megatron.core import parallel_state

    shape = list(param.shape)
    if getattr(param, "tensor_model_parallel", False):
        shape[param.partition_dim] *= parallel_state.get_tensor_model_parallel_world_size()
    return shape


def deterministic_parameters(model) -> None:
    """Overwrite every parameter with its slice of `full_value(global name)`."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(_shard(param, full_value(global_name(model, name), full_shape(param))))


def load_example():
    spec = importlib.util.spec_from_file_location("pretrain_gpt_tokweight", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def unwrap(model_chunk):
    while hasattr(model_chunk, "module"):
        model_chunk = model_chunk.module
    return model_chunk


def run_pretrain(argv):
    """One `pretrain()` through the drop-in script with `argv`; returns (the loss dict of every
    logged iteration, {iteration: {global name: (this rank's gradient shard, TP rank, partition
    dim)}} of the gradients each optimizer step used)."""
    import megatron.training.training as training
    from megatron.core import parallel_state

    example = load_example()
    build = example.model_provider

    def model_provider(*args, **kwargs):
        model = build(*args, **kwargs)
        deterministic_parameters(model)
        return model

    losses, params = [], {}  # params: the gradients by step
    log, step = training.training_log, training.train_step

    def training_log(loss_dict, *args, **kwargs):
        losses.append({key: float(value) for key, value in loss_dict.items()})
        return log(loss_dict, *args, **kwargs)

    def train_step(*args, **kwargs):
        out = step(*args, **kwargs)
        model = unwrap(kwargs["model"][0] if "model" in kwargs else args[2][0])
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        # the gradients the optimizer stepped with: DP-reduced, scaled and, under PP, the tied
        # embedding copies summed by finalize_model_grads (DDP keeps them in main_grad)
        params[len(params) + 1] = {
            global_name(model, name): ((p.main_grad if hasattr(p, "main_grad") else p.grad).detach().clone(), tp_rank,
                                       p.partition_dim if getattr(p, "tensor_model_parallel", False) else None)
            for name, p in model.named_parameters()}
        return out

    example.model_provider = model_provider
    training.training_log, training.train_step = training_log, train_step
    saved_argv = sys.argv
    sys.argv = ["pretrain_gpt_tokweight.py", *argv]
    try:
        with CudaToCpu():
            example.main()
    except SystemExit as stop:  # training.py ends the program at --exit-interval (after saving), code 0
        if stop.code != 0:  # a bare sys.exit() is how checkpointing.py gives up
            raise
    finally:
        sys.argv = saved_argv
        training.training_log, training.train_step = log, step
    return losses, params
