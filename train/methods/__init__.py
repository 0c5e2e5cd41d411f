"""The pruning methods of the command line, one module a family, each registered once
(registry.py derives the rest). Adding a method: a module like these and one import below."""
# each registers its family, in the order of --help and of the --prune-method choices
from . import dap  # noqa: F401
from . import wdprune  # noqa: F401
from . import savit  # noqa: F401
from .registry import (FAMILIES, Family, add_flags, build_pruner, check_config, check_flags, family_of,
                       keeps_lr_constant, methods, register)
