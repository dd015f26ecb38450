"""QuantFace calibration in PyTorch: fake-quant layers, rotation-scaling channel balancing, QD-LoRA,
the baselines, and the recipe that export reads. Entry point: ``calibrate(CalibConfig)``."""

from calibration.config import CalibConfig, parse_bits
from calibration.methods import METHODS, MethodSpec, get_method

__all__ = ["CalibConfig", "METHODS", "MethodSpec", "get_method", "parse_bits", "calibrate"]


def calibrate(cfg: CalibConfig):
    """Run one calibration method, write its recipe folder, return a ``CalibrationResult``
    (recipe path, calibrated model, seconds); see ``calibration.run``."""
    from calibration.run import calibrate as _calibrate

    return _calibrate(cfg)
