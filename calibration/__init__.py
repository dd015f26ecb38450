"""QuantFace calibration in PyTorch: fake-quant layers, rotation-scaling channel balancing, QD-LoRA,
the baselines, and the recipe that export reads. Entry point: ``calibrate(CalibConfig)``."""

if __name__ != "quantface.calibration":  # the folder imported as a bare top-level package (e.g. from the repo root)
    raise ImportError(f"calibration/ is the package quantface.calibration; import quantface.calibration, not {__name__}")


from quantface.calibration.config import CalibConfig, parse_bits
from quantface.calibration.methods import METHODS, MethodSpec, get_method

__all__ = ["CalibConfig", "METHODS", "MethodSpec", "get_method", "parse_bits", "calibrate"]


def calibrate(cfg: CalibConfig):
    """Run one calibration method, write its recipe folder, return a ``CalibrationResult``
    (recipe path, calibrated model, seconds); see ``calibration.run``."""
    from quantface.calibration.run import calibrate as _calibrate

    return _calibrate(cfg)
