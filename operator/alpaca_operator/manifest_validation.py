"""Validate an AlpacaFineTune as the API server would, without one: the CRD's structural
schema with its defaults, then its CEL rules (cel-python, with Kubernetes' quantity
functions added). For `alpaca-finetune submit-sagemaker`, which submits without a cluster.

Errors read like the API server's (field path, then what is wrong), e.g.
`spec.training.epochs: Invalid value: 0: spec.training.epochs in body should be greater than 0`.
Transition rules (those reading oldSelf) only apply to updates, so they are skipped, as on
a create.
"""
from __future__ import annotations

import copy
import decimal
import functools
import json
import re
from pathlib import Path
from typing import Any, Mapping

import yaml

# Package data (pyproject.toml): in the source tree a symlink to the one CRD (manifests/crd/,
# which the chart's files/crd/ links to), in a wheel its copy, so an installed
# alpaca-finetune validates without the repository.
CRD_PATH = Path(__file__).resolve().parent / "crd" / "alpacafinetunes.alpaca.dev.yaml"


class ManifestError(ValueError):
    def __init__(self, kind: str, name: str, errors: list[str]):
        self.errors = errors
        detail = errors[0] if len(errors) == 1 else "\n" + "\n".join(f"* {e}" for e in errors)
        super().__init__(f'The {kind} "{name}" is invalid: {detail}')


class UnknownFieldError(ValueError):
    """Like the API server's strict decoding: reported alone, before any validation."""

    def __init__(self, fields: list[str]):
        self.errors = [f'unknown field "{f}"' for f in fields]
        super().__init__('AlpacaFineTune in version "v1alpha1" cannot be handled as a AlpacaFineTune: '
                         "strict decoding error: " + ", ".join(self.errors))


@functools.lru_cache(maxsize=1)
def crd_schema(path: str | None = None) -> dict:
    crd = yaml.safe_load(Path(path or CRD_PATH).read_text())
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


# ---- Kubernetes quantities (the CEL library's isQuantity/quantity) -----------------------

_QUANTITY = re.compile(r"^([+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))(Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E|[eE][+-]?[0-9]+)?$")
_SUFFIX = {"Ki": 2 ** 10, "Mi": 2 ** 20, "Gi": 2 ** 30, "Ti": 2 ** 40, "Pi": 2 ** 50, "Ei": 2 ** 60,
           "n": decimal.Decimal("1e-9"), "u": decimal.Decimal("1e-6"), "m": decimal.Decimal("1e-3"),
           "k": 10 ** 3, "M": 10 ** 6, "G": 10 ** 9, "T": 10 ** 12, "P": 10 ** 15, "E": 10 ** 18}


def parse_quantity(s: str) -> decimal.Decimal | None:
    m = _QUANTITY.match(s)
    if not m:
        return None
    number, suffix = decimal.Decimal(m.group(1)), m.group(2)
    if not suffix:
        return number
    if suffix[0] in "eE" and len(suffix) > 1:
        return number * decimal.Decimal(10) ** int(suffix[1:])
    return number * decimal.Decimal(_SUFFIX[suffix])


def _cel_functions() -> dict:
    from celpy import celtypes

    def is_quantity(s):
        return celtypes.BoolType(parse_quantity(str(s)) is not None)

    def quantity(s):
        q = parse_quantity(str(s))
        if q is None:
            raise ValueError(f"invalid quantity {s!r}")
        return celtypes.StringType(str(q))

    def greater(a, b):
        return celtypes.BoolType(decimal.Decimal(str(a)) > decimal.Decimal(str(b)))

    def less(a, b):
        return celtypes.BoolType(decimal.Decimal(str(a)) < decimal.Decimal(str(b)))

    return {"isQuantity": is_quantity, "quantity": quantity, "isGreaterThan": greater, "isLessThan": less}


@functools.lru_cache(maxsize=512)
def _program(rule: str):
    import celpy
    env = celpy.Environment()
    return env.program(env.compile(rule), functions=_cel_functions())


def _cel(rule: str, value: Any) -> Any:
    import celpy
    return _program(rule).evaluate({"self": celpy.json_to_cel(value)})


# ---- the structural schema ----------------------------------------------------------------

def _fmt(value: Any) -> str:
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (dict, list)):
        return '"object"' if isinstance(value, dict) else '"array"'
    return json.dumps(value)


def _type_ok(schema: Mapping[str, Any], value: Any) -> bool:
    if schema.get("x-kubernetes-int-or-string"):
        return isinstance(value, (int, str)) and not isinstance(value, bool)
    t = schema.get("type")
    return {
        None: True,
        "object": isinstance(value, dict),
        "array": isinstance(value, list),
        "string": isinstance(value, str),
        "boolean": isinstance(value, bool),
        "integer": isinstance(value, int) and not isinstance(value, bool),
        "number": isinstance(value, (int, float)) and not isinstance(value, bool),
    }[t]


def _go_regex(p: str) -> re.Pattern:
    # RE2's Unicode classes in Python's terms (\w: letters, digits and "_").
    return re.compile(p.replace(r"\p{L}", r"\w").replace(r"\p{Z}", r"\s").replace(r"\p{N}", r"\d"))


def _check(schema: Mapping[str, Any], value: Any, path: str, errors: list[str],
           rules: list[tuple[Mapping[str, Any], Any, str, str]] | None = None) -> Any:
    """Returns the value with defaults applied; appends problems to errors, and the CEL rules
    to check (rule, value, path) to `rules` (evaluated once the schema is satisfied)."""
    if not _type_ok(schema, value):
        errors.append(f"{path}: Invalid value: {_fmt(value)}: {path} in body must be of type "
                      f"{schema.get('type')}: {_fmt(value)}")
        return value
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{path}: Unsupported value: {_fmt(value)}: supported values: "
                      + ", ".join(_fmt(v) for v in schema["enum"]))
    if isinstance(value, (int, float)) and not isinstance(value, bool) and not schema.get("x-kubernetes-int-or-string"):
        if "minimum" in schema:
            lo = schema["minimum"]
            if schema.get("exclusiveMinimum") and value <= lo:
                errors.append(f"{path}: Invalid value: {_fmt(value)}: {path} in body should be greater than {lo}")
            elif value < lo:
                errors.append(f"{path}: Invalid value: {_fmt(value)}: {path} in body should be greater than or equal to {lo}")
        if "maximum" in schema:
            hi = schema["maximum"]
            if schema.get("exclusiveMaximum") and value >= hi:
                errors.append(f"{path}: Invalid value: {_fmt(value)}: {path} in body should be less than {hi}")
            elif value > hi:
                errors.append(f"{path}: Invalid value: {_fmt(value)}: {path} in body should be less than or equal to {hi}")
    if isinstance(value, str):
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            errors.append(f"{path}: Too long: may not be more than {schema['maxLength']} bytes")
        if "minLength" in schema and len(value) < schema["minLength"]:
            errors.append(f"{path}: Invalid value: {_fmt(value)}: {path} in body should be at least "
                          f"{schema['minLength']} chars long")
        if "pattern" in schema and not _go_regex(schema["pattern"]).search(value):
            errors.append(f"{path}: Invalid value: {_fmt(value)}: {path} in body should match '{schema['pattern']}'")
    if isinstance(value, list):
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            errors.append(f"{path}: Too many: {len(value)}: must have at most {schema['maxItems']} items")
        if "minItems" in schema and len(value) < schema["minItems"]:
            errors.append(f"{path}: Invalid value: {len(value)}: {path} in body should have at least "
                          f"{schema['minItems']} items")
        items = schema.get("items") or {}
        value = [_check(items, v, f"{path}[{i}]", errors, rules) for i, v in enumerate(value)]
        keys = schema.get("x-kubernetes-list-map-keys")
        if keys and schema.get("x-kubernetes-list-type") == "map":
            seen = set()
            for i, v in enumerate(value):
                key = tuple(v.get(k) for k in keys) if isinstance(v, dict) else None
                if key in seen:
                    errors.append(f"{path}[{i}]: Duplicate value: " + json.dumps({k: v.get(k) for k in keys}))
                seen.add(key)
    if isinstance(value, dict):
        props = schema.get("properties")
        value = dict(value)
        if props is not None:
            for k in value:
                if k not in props and not isinstance(schema.get("additionalProperties"), dict) and path != "metadata":
                    errors.append(f'unknown field "{path}.{k}"' if path else f'unknown field "{k}"')
            for k, sub in props.items():
                if k not in value and "default" in sub:
                    value[k] = copy.deepcopy(sub["default"])
            for k in schema.get("required") or ():
                if k not in value:
                    errors.append(f"{path}.{k}: Required value" if path else f"{k}: Required value")
            for k, sub in props.items():
                if k in value:
                    value[k] = _check(sub, value[k], f"{path}.{k}" if path else k, errors, rules)
        add = schema.get("additionalProperties")
        if isinstance(add, dict):
            if "maxProperties" in schema and len(value) > schema["maxProperties"]:
                errors.append(f"{path}: Too many: {len(value)}: must have at most {schema['maxProperties']} items")
            for k in list(value):
                value[k] = _check(add, value[k], f"{path}[{k}]", errors, rules)
    if rules is not None:
        rules += [(rule, value, path, str(schema.get("type") or ""))
                  for rule in schema.get("x-kubernetes-validations") or ()]
    return value


_REASON_PHRASE = {"FieldValueRequired": "Required value", "FieldValueForbidden": "Forbidden",
                  "FieldValueDuplicate": "Duplicate value"}


def _rule(rule: Mapping[str, Any], value: Any, path: str, type_: str, errors: list[str]) -> None:
    """The API server shows the schema type of the rule's node, not the value itself."""
    text = rule["rule"]
    if "oldSelf" in text:
        return      # a transition rule: updates only
    try:
        ok = _cel(text, value)
    except Exception as e:  # noqa: BLE001 - an evaluation error is a validation error, as in the API server
        errors.append(f"{path or '<root>'}: Invalid value: \"{type_}\": rule {text!r} could not be evaluated: {e}")
        return
    if bool(ok):
        return
    message = rule.get("message") or f"failed rule: {text}"
    if rule.get("messageExpression"):
        try:
            message = str(_cel(rule["messageExpression"], value))
        except Exception:  # noqa: BLE001 - the API server falls back to message too
            pass
    field = path + (rule.get("fieldPath") or "")
    phrase = _REASON_PHRASE.get(rule.get("reason", ""), None)
    if phrase:
        errors.append(f"{field}: {phrase}: {message}")
    else:
        errors.append(f"{field or '<root>'}: Invalid value: \"{type_}\": {message}")


_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
NOT_CHECKED = ("<nil>: Invalid value: null: some validation rules were not checked because the object was "
               "invalid; correct the existing errors to complete validation")


def validate_manifest(obj: Any, schema: Mapping[str, Any] | None = None) -> dict:
    """The object with the CRD's defaults applied, or ManifestError listing every problem
    (UnknownFieldError for unknown fields, which the API server reports alone)."""
    if not isinstance(obj, dict):
        raise ManifestError("AlpacaFineTune", "", ["the document is not an object"])
    name = str((obj.get("metadata") or {}).get("name") or "")
    errors: list[str] = []
    if obj.get("apiVersion") != "alpaca.dev/v1alpha1" or obj.get("kind") != "AlpacaFineTune":
        raise ManifestError(str(obj.get("kind") or "object"), name, [
            f"apiVersion/kind: Invalid value: must be alpaca.dev/v1alpha1 AlpacaFineTune, not "
            f"{obj.get('apiVersion')}/{obj.get('kind')}"])
    if not name:
        errors.append("metadata.name: Required value: name or generateName is required")
    elif len(name) > 253 or not _DNS_SUBDOMAIN.match(name):
        errors.append(f'metadata.name: Invalid value: "{name}": a lowercase RFC 1123 subdomain must consist of '
                      "lower case alphanumeric characters, '-' or '.', and must start and end with an "
                      "alphanumeric character (e.g. 'example.com', regex used for validation is "
                      "'[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')")
    rules: list[tuple[Mapping[str, Any], Any, str, str]] = []
    out = _check(schema or crd_schema(), obj, "", errors, rules)
    unknown = [e.split('"')[1] for e in errors if e.startswith("unknown field")]
    if unknown:
        raise UnknownFieldError(unknown)
    if errors:
        # Like the API server: the CEL rules wait until the schema is satisfied.
        raise ManifestError("AlpacaFineTune", name, errors + [NOT_CHECKED])
    # Deepest first, as the API server reports them.
    for rule, value, path, type_ in sorted(rules, key=lambda r: -r[2].count(".")):
        _rule(rule, value, path, type_, errors)
    if errors:
        raise ManifestError("AlpacaFineTune", name, errors)
    return out
