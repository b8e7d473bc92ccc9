"""What the real CreateTrainingJob refuses: botocore's service model (required fields, types,
minimums, and the maximums, patterns and enums botocore itself does not check) plus AWS's
documented limits that the model leaves out or states laxer. Pure.

Two users: the request builder (backends/sagemaker/request.py), so a run is refused before
anything is created, and the local stand-in (hack/sagemaker_local/standin.py), which plays
SageMaker and must refuse what SageMaker refuses; moto checks none of this (tests/
test_sagemaker_limits.py records, constraint by constraint, that moto lets it through).
Kept out of backends/ so the stand-in imports it without the operator's dependencies.
"""
from __future__ import annotations

import re
from functools import lru_cache
from typing import Any, Mapping

# Documented in the CreateTrainingJob reference; the service model says 2500.
HYPERPARAMETER_VALUE_MAX = 256
# The model caps each key and value (512) but not their sum; AWS documents a 32 KB total for a
# container's Environment (ContainerDefinition), and the training reference no other, so the
# stricter bound applies here too.
ENVIRONMENT_TOTAL_MAX = 32 * 1024
# "aws:" is reserved for AWS's own tags (Tagging AWS resources, "Tag naming limits").
RESERVED_TAG_PREFIX = "aws:"
# SageMaker pulls from ECR, unless TrainingImageConfig sends the job through its VPC to a
# private registry. spec.py's ECR_IMAGE_PATTERN is the same as the CRD's.
ECR_IMAGE_PATTERN = (r"^[0-9]{12}\.dkr\.ecr\.[a-z]{2}(-[a-z]+)+-[0-9]{1,2}\.amazonaws\.com(\.cn)?/"
                     r"[a-z0-9]+([._-][a-z0-9]+)*(/[a-z0-9]+([._-][a-z0-9]+)*)*"
                     r"(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}|@sha256:[a-f0-9]{64})?$")


def is_ecr_image(image: str) -> bool:
    return re.match(ECR_IMAGE_PATTERN, image) is not None


@lru_cache(maxsize=1)
def operation_model():
    import botocore.session
    return botocore.session.get_session().get_service_model("sagemaker").operation_model("CreateTrainingJob")


def _pattern(p: str) -> re.Pattern:
    # Java's Unicode classes in the model's patterns, in Python's terms: \w is letters, digits
    # and "_" (which the tag pattern allows anyway); \p{Alnum} appears only inside a class.
    p = (p.replace(r"\p{L}", r"\w").replace(r"\p{Z}", r"\s").replace(r"\p{N}", r"\d")
         .replace(r"\p{Alnum}", "0-9A-Za-z"))
    return re.compile(p, re.DOTALL)


_PATTERNS: dict[str, re.Pattern] = {}


def _walk(shape, value: Any, path: str, errors: list[str]) -> None:
    md = shape.metadata
    kind = shape.type_name
    if kind == "string" and isinstance(value, str):
        if "max" in md and len(value) > md["max"]:
            errors.append(f"{path}: {len(value)} characters, at most {md['max']} allowed")
        if "pattern" in md:
            rx = _PATTERNS.get(md["pattern"]) or _PATTERNS.setdefault(md["pattern"], _pattern(md["pattern"]))
            if not rx.fullmatch(value):
                errors.append(f"{path}: {value[:80]!r} does not match {md['pattern']}")
        if shape.enum and value not in shape.enum:
            errors.append(f"{path}: {value!r} is not one of {', '.join(shape.enum)}")
    elif kind in ("integer", "long") and isinstance(value, int):
        if "max" in md and value > md["max"]:
            errors.append(f"{path}: {value} is more than {md['max']}")
    elif kind == "structure" and isinstance(value, Mapping):
        for key, v in value.items():
            if key in shape.members:
                _walk(shape.members[key], v, f"{path}.{key}" if path else key, errors)
    elif kind == "list" and isinstance(value, list):
        if "max" in md and len(value) > md["max"]:
            errors.append(f"{path}: {len(value)} items, at most {md['max']} allowed")
        for i, v in enumerate(value):
            _walk(shape.member, v, f"{path}[{i}]", errors)
    elif kind == "map" and isinstance(value, Mapping):
        if "max" in md and len(value) > md["max"]:
            errors.append(f"{path}: {len(value)} entries, at most {md['max']} allowed")
        for k, v in value.items():
            _walk(shape.key, k, f"{path} key {k[:40]!r}", errors)
            _walk(shape.value, v, f"{path}[{k[:40]!r}]", errors)


def _documented(params: Mapping[str, Any]) -> list[str]:
    errors: list[str] = []
    for k, v in (params.get("HyperParameters") or {}).items():
        if isinstance(v, str) and len(v) > HYPERPARAMETER_VALUE_MAX:
            errors.append(f"HyperParameters[{k!r}]: {len(v)} characters, at most {HYPERPARAMETER_VALUE_MAX} allowed")
    algo = params.get("AlgorithmSpecification") or {}
    image = algo.get("TrainingImage")
    access = ((algo.get("TrainingImageConfig") or {}).get("TrainingRepositoryAccessMode")) or "Platform"
    if isinstance(image, str) and access != "Vpc" and not is_ecr_image(image):
        errors.append(f"AlgorithmSpecification.TrainingImage: {image[:255]!r} is not an Amazon ECR image "
                      "(ACCOUNT.dkr.ecr.REGION.amazonaws.com[.cn]/REPO[:TAG|@DIGEST]); a private registry needs "
                      "TrainingImageConfig.TrainingRepositoryAccessMode Vpc")
    if access == "Vpc" and not params.get("VpcConfig"):
        errors.append("AlgorithmSpecification.TrainingImageConfig: TrainingRepositoryAccessMode Vpc needs a VpcConfig")
    env = params.get("Environment") or {}
    total = sum(len(str(k).encode()) + len(str(v).encode()) for k, v in env.items())
    if total > ENVIRONMENT_TOTAL_MAX:
        errors.append(f"Environment: {total} bytes of keys and values, at most {ENVIRONMENT_TOTAL_MAX} allowed")
    for i, tag in enumerate(params.get("Tags") or []):
        key = tag.get("Key") if isinstance(tag, Mapping) else None
        if isinstance(key, str) and key.lower().startswith(RESERVED_TAG_PREFIX):
            errors.append(f"Tags[{i}].Key: {key[:80]!r}: the prefix aws: is reserved for AWS's own tags")
    return errors


def create_training_job_errors(params: Mapping[str, Any]) -> list[str]:
    """Every reason the real CreateTrainingJob would refuse params (empty: none found)."""
    from botocore.validate import ParamValidator
    model = operation_model()
    errors: list[str] = []
    report = ParamValidator().validate(params, model.input_shape)
    if report.has_errors():
        errors += [line.strip() for line in report.generate_report().splitlines() if line.strip()]
    _walk(model.input_shape, params, "", errors)
    return errors + _documented(params)
