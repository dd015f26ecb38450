"""JSON round-trip for the toolchain's config dataclasses (nested dataclasses and tuples included)."""

from __future__ import annotations

import dataclasses
import json
import typing
from typing import Any, TypeVar

from quantface.errors import ConfigError

T = TypeVar("T", bound="JsonConfig")

# The ``--data`` value naming the LFW faces scikit-image ships (``quantface.data.shipped_lfw_faces``): what
# calibration can use without the data set, as the demo does. Here, not in ``quantface.data``, so the
# command line's help can name it without importing OpenCV.
SHIPPED_LFW = "skimage:lfw"


class JsonConfig:
    """Mixin for dataclasses: ``to_json`` / ``from_json``. Unknown keys are an error, not ignored."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls: type[T], raw: dict[str, Any]) -> T:
        if not isinstance(raw, dict):
            raise ConfigError(f"{cls.__name__} must be a JSON object, got {type(raw).__name__}")
        hints = typing.get_type_hints(cls)
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(raw) - names)
        if unknown:
            raise ConfigError(f"unknown {cls.__name__} keys: {', '.join(unknown)}")
        kwargs = {}
        for key, value in raw.items():
            hint = hints[key]
            if isinstance(hint, type) and issubclass(hint, JsonConfig) and isinstance(value, dict):
                value = hint.from_dict(value)
            elif isinstance(value, list) and typing.get_origin(hint) is tuple:
                value = tuple(value)
            kwargs[key] = value
        return cls(**kwargs)

    @classmethod
    def from_json(cls: type[T], text: str) -> T:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{cls.__name__} is not valid JSON: {exc}") from None
        return cls.from_dict(raw)


# Sides the restoration pipeline and the models take (the reference model's size_multiple).
SIZE_MULTIPLE = 16


def check_int(value: object, flag: str, minimum: int = 1) -> None:
    """``value`` is an integer of at least ``minimum``, else one ``ConfigError`` sentence naming ``flag``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{flag} {value!r} must be an integer of at least {minimum}" if not isinstance(value, int)
                          else f"{flag} {value} must be at least {minimum}")


def check_size(size: object, flag: str = "--size", multiple: int = SIZE_MULTIPLE) -> None:
    """An optional working size (None: the model's) is a positive multiple of ``multiple``."""
    if size is None:
        return
    if isinstance(size, bool) or not isinstance(size, int) or size < multiple or size % multiple:
        raise ConfigError(f"{flag} {size} must be a positive multiple of {multiple}")
