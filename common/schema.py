"""JSON Schema validation of settings (build configs, imagery options): Draft 2020-12 with one change, so that
code may index and count with what it accepts: an integer is a Python int (JSON Schema counts 3.0 as one, and
Python counts True)."""

from __future__ import annotations

from typing import Any

from jsonschema import Draft202012Validator, TypeChecker, validators


def _is_int(_: TypeChecker, value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


SettingsValidator = validators.extend(
    Draft202012Validator, type_checker=Draft202012Validator.TYPE_CHECKER.redefine("integer", _is_int)
)
