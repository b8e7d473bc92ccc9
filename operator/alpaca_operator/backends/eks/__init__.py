"""backend: eks — an Indexed Job of DeepSpeed pods on the cluster's GPU nodegroup."""
from .backend import EksBackend

__all__ = ["EksBackend"]
