"""What an instance type brings to a training run: GPUs, memory per GPU, EFA adapters.

One table for both backends. EC2 names ("p4d.24xlarge") are the EKS node label's values;
SageMaker's training instance types are the same names with an "ml." prefix. Figures are
AWS's published ones (the accelerated-computing instance pages): memory per GPU in GB as AWS
states it. Types not listed are unknown, never guessed: callers say so instead.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class InstanceType:
    gpus: int
    gpu_memory_gb: int      # per GPU
    gpu: str                # the accelerator, for messages
    efa: int = 0            # EFA adapters (NCCL spreads rings across all of them)


def _family(gpu: str, memory: int, sizes: dict[str, tuple[int, int]]) -> dict[str, InstanceType]:
    return {size: InstanceType(gpus, memory, gpu, efa) for size, (gpus, efa) in sizes.items()}


_SMALL_G = {"xlarge": (1, 0), "2xlarge": (1, 0), "4xlarge": (1, 0), "8xlarge": (1, 0), "16xlarge": (1, 0),
            "12xlarge": (4, 0), "24xlarge": (4, 0), "48xlarge": (8, 1)}

TABLE: dict[str, InstanceType] = {
    **{f"p3.{s}": t for s, t in _family("V100", 16, {"2xlarge": (1, 0), "8xlarge": (4, 0),
                                                     "16xlarge": (8, 0)}).items()},
    "p3dn.24xlarge": InstanceType(8, 32, "V100", 1),
    "p4d.24xlarge": InstanceType(8, 40, "A100", 4),
    "p4de.24xlarge": InstanceType(8, 80, "A100", 4),
    "p5.48xlarge": InstanceType(8, 80, "H100", 32),
    "p5e.48xlarge": InstanceType(8, 141, "H200", 32),
    "p5en.48xlarge": InstanceType(8, 141, "H200", 16),
    **{f"g4dn.{s}": t for s, t in _family("T4", 16, {"xlarge": (1, 0), "2xlarge": (1, 0), "4xlarge": (1, 0),
                                                     "8xlarge": (1, 0), "16xlarge": (1, 0),
                                                     "12xlarge": (4, 0), "metal": (8, 1)}).items()},
    **{f"g5.{s}": t for s, t in _family("A10G", 24, _SMALL_G).items()},
    **{f"g6.{s}": t for s, t in _family("L4", 24, _SMALL_G).items()},
    # Trainium: no GPUs, listed for their EFA adapters.
    "trn1.32xlarge": InstanceType(0, 0, "Trainium", 8),
    "trn1n.32xlarge": InstanceType(0, 0, "Trainium", 16),
    **{f"g6e.{s}": t for s, t in _family("L40S", 48, {**_SMALL_G, "12xlarge": (4, 1), "24xlarge": (4, 2),
                                                      "48xlarge": (8, 4)}).items()},
}


def lookup(instance_type: str | None) -> InstanceType | None:
    """The entry for an EC2 or SageMaker ("ml.") instance type; None when unknown."""
    if not instance_type:
        return None
    return TABLE.get(instance_type.removeprefix("ml."))
