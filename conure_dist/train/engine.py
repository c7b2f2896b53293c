"""DeepSpeed behind the stage loop's :class:`~conure_dist.train.loop.Stepper`.

The DeepSpeed config is generated from the task's :class:`~conure_dist.config.TrainConfig`
and the cluster settings (ZeRO stage 0/1/2, bf16 on GPU, fp32 on CPU). Only the parameters the
current owner-map view trains are handed to the optimizer; frozen values live in buffers that
no optimizer, ZeRO partition or master copy ever holds.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from conure_dist.config import TrainConfig
from conure_dist.model import ConureModel, Weights


# glibc's malloc maps every large block (a T1 step's [rows x sampled items] logits are ~0.5 GiB at
# 646K items) fresh from the kernel and unmaps it when it is freed, so each step faults its large
# buffers in again, 4 KiB at a time: at 646K items that was a third of a CPU step. With this
# tunable (glibc 2.35+; other C libraries and older glibc ignore it) those mappings are asked for
# transparent huge pages, which the kernel gives where THP is "madvise" or "always".
HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"


def allocator_env(environ: Any = os.environ) -> dict[str, str]:
    """Environment of the processes that train and score (Ray Train workers, scoring actors):
    ``GLIBC_TUNABLES`` with :data:`HUGE_PAGES_TUNABLE` added to whatever the driver's
    environment sets; a ``glibc.malloc.hugetlb`` set there (``=0`` turns it off) is kept."""
    tunables = environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb=" not in tunables:
        tunables = ":".join(t for t in (tunables, HUGE_PAGES_TUNABLE) if t)
    return {"GLIBC_TUNABLES": tunables}


def native_bf16(device: torch.device | str = "cpu") -> bool:
    """Whether ``device`` computes in bf16 in hardware: a CUDA device that supports it, or a CPU
    with AVX512-BF16 or AMX. Elsewhere torch emulates bf16 with fp32 instructions: on an
    AVX2-only CPU the backbone's step took 17-19x as long in bf16 as in fp32 (BENCHMARKS.md)."""
    device = torch.device(device)
    if device.type == "cuda":  # not counting emulation (pre-Ampere cards)
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":  # torch's own CPU feature checks (its CPU module keeps them private)
        checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
        return any(check() for check in checks if check is not None)
    return True


def emulated_bf16_warning(precision: str, device: torch.device) -> str | None:
    """The warning for a stage asked to run in bf16 on a device that would emulate it."""
    if precision != "bf16" or native_bf16(device):
        return None
    needs = "a GPU of compute capability 8.0 or later" if device.type == "cuda" else "a CPU with AVX512-BF16 or AMX"
    return (f"warning: cluster.precision is bf16, but this {device.type} has no bf16 arithmetic in hardware "
            f"({needs}): torch emulates it, many times slower than fp32")


@dataclass(frozen=True)
class EngineSettings:
    zero_stage: int = 0
    precision: str = "fp32"  # fp32 | bf16
    micro_batch_size: int = 32

    def __post_init__(self) -> None:
        if self.zero_stage not in (0, 1, 2):
            raise ValueError(f"zero_stage: one of 0, 1, 2 (ZeRO-3 partitions parameters, which breaks masking); got {self.zero_stage}")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision: fp32 or bf16, got {self.precision!r}")


def deepspeed_config(train: TrainConfig, settings: EngineSettings, user: dict | None = None) -> dict[str, Any]:
    """The DeepSpeed JSON config of one stage, with a user's section (``deepspeed:`` in the run
    config, checked by :func:`conure_dist.config.check_deepspeed_section`) merged in."""
    return merge_dicts(_generated_config(train, settings), user or {})


def merge_dicts(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = merge_dicts(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _generated_config(train: TrainConfig, settings: EngineSettings) -> dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": settings.micro_batch_size,
        "gradient_accumulation_steps": 1,
        "optimizer": {
            "type": "AdamW" if train.optimizer == "adamw" else "Adam",
            # torch's Adam/AdamW: no JIT build of DeepSpeed's fused kernels on CPU machines;
            # torch's fused implementation (CPU and CUDA): 8x faster than foreach on the two
            # 646K x 256 item tables on CPU (BENCHMARKS.md, T1 step).
            "params": {"lr": train.lr, "weight_decay": train.weight_decay, "torch_adam": True,
                       "adam_w_mode": train.optimizer == "adamw", "fused": True},
        },
        "zero_optimization": {"stage": settings.zero_stage},
        "bf16": {"enabled": settings.precision == "bf16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def prepare_deepspeed_import() -> None:
    """Settings that must precede ``import deepspeed`` / initialisation on CPU machines."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed.ops

    # The shared-memory comm op serves only tensor-parallel inference; skipping it avoids a
    # ~20 s JIT build on every fresh machine.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    import logging

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)


class DeepSpeedStepper:
    """Wraps a model in a DeepSpeed engine; ``step(loss)`` = backward + optimizer step."""

    def __init__(self, model: ConureModel, train: TrainConfig, settings: EngineSettings, user_config: dict | None = None):
        prepare_deepspeed_import()
        import deepspeed

        params = model.trainable_parameters()
        if not params:
            raise ValueError("nothing to train: the current view has no trainable parameter")
        self.settings = settings
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, model_parameters=params, config=deepspeed_config(train, settings, user_config)
        )
        self.model = model
        self._masters: dict[int, torch.Tensor] | None = None
        # DeepSpeed casts parameters (bf16) but not buffers: keep frozen values in the compute
        # precision so the masked weight has one dtype.
        for _, module in model.masked_modules():
            module.weight_frozen.data = module.weight_frozen.data.to(module.weight.dtype)

    def step(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)
        self.engine.step()

    def fp32_weights(self) -> Weights:
        """Effective weights in fp32: the optimizer's master copy for trained parameters.

        Every rank must call this, in step: reading ZeRO-1/2 master copies is a collective.
        """
        out = self.model.weights()
        if self.settings.precision == "fp32":
            return out
        masks = {name: m.weight_trainable.cpu() for name, m in self.model.masked_modules()}
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            master = self._master_copy(p).detach().float().cpu()
            out[name] = torch.where(masks[name], master, out[name]) if name in masks else master
        return out

    def _master_copy(self, param: torch.nn.Parameter) -> torch.Tensor:
        if self.settings.zero_stage == 0:
            # ZeRO-0 bf16 keeps fp32 copies in the optimizer's groups, parallel to the bf16 ones.
            opt = self.engine.optimizer
            if self._masters is None:
                self._masters = {id(lp): hp for lg, hg in zip(opt.fp16_groups, opt.fp32_groups) for lp, hp in zip(lg, hg)}
            return self._masters[id(param)]
        from deepspeed.utils import safe_get_full_fp32_param

        master = safe_get_full_fp32_param(param)
        if master is None:
            raise RuntimeError("DeepSpeed returned no fp32 master copy of a trained parameter")
        return master

    def close(self) -> None:
        """Release the engine (DeepSpeed's ``destroy``: ZeRO-1/2 gradient hooks otherwise keep the
        optimizer, its partitions and the model alive after the stage, in a worker that runs the
        next stage next)."""
        self.engine.destroy()
        self._masters = None

    def save(self, directory: str, tag: str = "stage") -> None:
        self.engine.save_checkpoint(directory, tag=tag)  # every rank: it has barriers

    def load(self, directory: str, tag: str = "stage") -> None:
        path, _ = self.engine.load_checkpoint(directory, tag=tag)
        if path is None:
            raise RuntimeError(f"no DeepSpeed checkpoint with tag {tag!r} under {directory}")
