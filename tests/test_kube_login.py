"""The operator's in-cluster login: the API server the pod is told of, not kopf's fixed one."""
from alpaca_operator.kube import in_cluster_server


def test_in_cluster_server_follows_the_kubelets_service_variables():
    assert in_cluster_server({"KUBERNETES_SERVICE_HOST": "10.0.0.1", "KUBERNETES_SERVICE_PORT": "443"}) \
        == "https://10.0.0.1:443"
    # A node agent serving the API elsewhere (hack/localexec), and IPv6 clusters.
    assert in_cluster_server({"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": "39743"}) \
        == "https://127.0.0.1:39743"
    assert in_cluster_server({"KUBERNETES_SERVICE_HOST": "fd00::1", "KUBERNETES_SERVICE_PORT": "443"}) \
        == "https://[fd00::1]:443"
    assert in_cluster_server({}) == "https://kubernetes.default.svc"
