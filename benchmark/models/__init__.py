"""Multi-exit networks: registered backbones cut into blocks, exit heads placed by index or by FLOPs."""

from benchmark.models.multi_exit import MultiExitNet
from benchmark.models.registry import (
    EXIT_TOLERANCE, ExitPlacement, arch_input_kind, arch_names, arch_table, arch_task, build_model, exit_placement,
    exit_placement_warnings, register_arch,
)

# Importing a family module registers its architectures.
from benchmark.models import msdnet, segmentation, small, timm_nets, torchvision_nets  # noqa: E402,F401  isort: skip

__all__ = ["EXIT_TOLERANCE", "ExitPlacement", "MultiExitNet", "arch_input_kind", "arch_names", "arch_table",
           "arch_task", "build_model", "exit_placement", "exit_placement_warnings", "register_arch"]
