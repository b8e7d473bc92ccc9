"""The SageMaker backend: a run becomes a bring-your-own-container training job.

names.py (job names), request.py (the pure CreateTrainingJob builder and its validation),
mapping.py (DescribeTrainingJob -> Observation, pure), client.py (boto3, errors sorted),
backend.py (the Backend protocol's I/O).
"""
from .backend import SageMakerBackend

__all__ = ["SageMakerBackend"]
