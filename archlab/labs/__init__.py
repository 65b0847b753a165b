"""Labs: the lessons' claims as experiments a user can run and see plotted (``archlab lab``).

Importing this package registers every lab (each module but the registry defines one or more).
"""

import importlib
import pkgutil

from archlab.labs.registry import (
    LABS,
    QUICK_UNDECIDED,
    VERDICTS,
    Lab,
    LabReport,
    LabResult,
    get_lab,
    list_labs,
    register_lab,
    run_lab,
    verdict_label,
)  # fmt: skip

for _info in pkgutil.iter_modules(__path__):
    if _info.name != "registry":
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = [
    "LABS", "QUICK_UNDECIDED", "VERDICTS", "Lab", "LabReport", "LabResult", "get_lab", "list_labs", "register_lab",
    "run_lab", "verdict_label",
]  # fmt: skip
