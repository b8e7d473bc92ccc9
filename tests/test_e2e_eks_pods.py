"""test_e2e_eks's real training, with the operator in ALPACA_EKS_WORKLOAD=pods: a gang of
two bare pods run by the local-exec agent as real processes, rendezvous through the
headless Service's name, the model and manifest.json back in S3."""
from __future__ import annotations

import pytest

from alpaca_operator import api
from operator_harness import OperatorProcess
from test_e2e_eks import deepspeed_ops, inputs, served  # noqa: F401 - fixtures
from test_e2e_eks import test_a_finetune_trains_for_real_through_the_operator  # noqa: F401 - run here too


@pytest.fixture(scope="module")
def operator(cluster, crd, tmp_path_factory):
    op = OperatorProcess({**cluster.env, api.WORKLOAD_ENV: "pods"}, tmp_path_factory.mktemp("operator") / "operator.log")
    op.start()
    yield op
    op.stop()
