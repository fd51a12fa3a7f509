"""Which library each `*_precision` value needs, and whether it is installed (no heavy imports).

SimpleTuner's precision names: `<format>-<library>`. The quantised weights are frozen:
LoRA/LyCORIS train beside them; a full fine-tune cannot train them.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from simpletuner.config.schema import TrainingConfig


@dataclass(frozen=True)
class Library:
    package: str  # what pip installs
    module: str  # what Python imports


QUANTO = Library("optimum-quanto", "optimum.quanto")
TORCHAO = Library("torchao", "torchao")
BITSANDBYTES = Library("bitsandbytes", "bitsandbytes")

# precision -> the library that quantises to it
LIBRARY: dict[str, Library] = {
    "int8-quanto": QUANTO, "int4-quanto": QUANTO, "int2-quanto": QUANTO, "fp8-quanto": QUANTO,
    "fp8uz-quanto": QUANTO, "int8-torchao": TORCHAO, "fp8-torchao": TORCHAO, "nf4-bnb": BITSANDBYTES,
}
# precisions whose kernels need a CUDA device (torchao's float8 activations need compute capability 8.9+)
CUDA_ONLY: dict[str, str] = {"fp8-torchao": "torchao's float8 matmuls need a CUDA GPU of compute capability 8.9 "
                                            "or newer; on this device use int8-quanto, int8-torchao or fp8-quanto"}
PRECISION_OPTIONS = ("base_model_precision", "text_encoder_1_precision", "text_encoder_2_precision",
                     "text_encoder_3_precision", "text_encoder_4_precision")


def requested(training: TrainingConfig) -> dict[str, str]:
    """The *_precision options that quantise, by name."""
    return {name: getattr(training, name) for name in PRECISION_OPTIONS
            if getattr(training, name, "no_change") != "no_change"}


def missing_libraries(training: TrainingConfig) -> list[str]:
    """One line per precision whose library is not installed, with the command that installs it."""
    problems = []
    for name, precision in requested(training).items():
        library = LIBRARY[precision]
        if importlib.util.find_spec(library.module.split(".")[0]) is None or (
                "." in library.module and importlib.util.find_spec(library.module) is None):
            problems.append(f"{name} = {precision!r} needs the {library.package} package, which is not installed: "
                            f"pip install 'simpletuner[quant]' (or pip install {library.package})")
    return problems
