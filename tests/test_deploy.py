"""Containers and Kubernetes, checked without a Docker engine or a cluster: the Dockerfiles are
linted with hadolint, the entrypoint serves outside Docker, and the manifests are validated against
Kubernetes' schemas and against config.properties' ports and paths."""

from __future__ import annotations

import base64
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import requests
import yaml

from helpers import BIN, ROOT, assert_schema, free_ports, read_properties

DOCKERFILES = [ROOT / "docker" / "Dockerfile", ROOT / "docker" / "Dockerfile.cuda"]
K8S = ROOT / "deploy" / "k8s"
K8S_VERSION = "1.33.0"


def test_hadolint_has_no_errors():
    r = subprocess.run(
        [str(BIN / "hadolint"), "--failure-threshold", "error", *map(str, DOCKERFILES)], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stdout + r.stderr
    # and nothing above "info" either
    assert not re.search(r"\b(error|warning)\b", r.stdout), r.stdout


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_essentials(dockerfile):
    text = dockerfile.read_text()
    froms = re.findall(r"^FROM\s+(\S+)", text, re.M)
    assert len(froms) >= 2, "multi-stage build"
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)", text, re.M).group(1)
    assert re.match(r"python:3\.11\.\d+-slim-\w+$", base), f"pinned base image, got {base}"
    assert "ARG OPT=" in text and '--optimization "${OPT}"' in text
    assert re.search(r"^USER 1000:1000$", text, re.M), "runs as a non-root user"
    assert re.search(r"^EXPOSE 8080 8082 8000$", text, re.M)  # management stays inside; 8000: FRONT=ray
    assert re.search(r'HEALTHCHECK .*\n\s+CMD \["python", "/app/scripts/probe.py", "ready"\]', text)
    assert 'ENTRYPOINT ["/app/docker/entrypoint.sh"]' in text and "BIND=0.0.0.0" in text
    assert "COPY weights" in text and "create_mar.py" in text  # the trained models, packed into the MAR
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        assert not line or line.startswith("#") or "==" in line, f"unpinned requirement {line}"
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and "checkpoints" in ignored


def test_entrypoint_serves_outside_docker(tmp_path, photos):
    """docker/entrypoint.sh as the image runs it: TorchServe in the foreground from a generated config."""
    store = tmp_path / "model_store"
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "create_mar.py"), "--export-path", str(store)],
        check=True,
        capture_output=True,
    )
    ports = free_ports(5)
    (tmp_path / "tmp").mkdir()
    env = dict(
        os.environ,
        BIND="127.0.0.1",
        MODEL_STORE=str(store),
        CONFIG_OUT=str(tmp_path / "config.properties"),
        INFERENCE_PORT=str(ports[0]),
        MANAGEMENT_PORT=str(ports[1]),
        METRICS_PORT=str(ports[2]),
        GRPC_INFERENCE_PORT=str(ports[3]),
        GRPC_MANAGEMENT_PORT=str(ports[4]),
        TMPDIR=str(tmp_path / "tmp"),
        TEMP=str(tmp_path / "tmp"),
        LOG_LOCATION=str(tmp_path / "logs"),
        METRICS_LOCATION=str(tmp_path / "logs"),
        PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}",
        DRAIN_SECONDS="6",
        DRAIN_FILE=str(tmp_path / "draining"),
    )
    out = open(tmp_path / "entrypoint.out", "wb")
    proc = subprocess.Popen(
        [str(ROOT / "docker" / "entrypoint.sh")], env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
    )
    base = f"http://127.0.0.1:{ports[0]}"
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "entrypoint.out").read_text()[-3000:]
            try:
                if requests.get(f"{base}/ping", timeout=3).status_code == 200:
                    r = requests.put(f"{base}/predictions/all", data=photos["coffee"], timeout=60)
                    if r.status_code == 200:
                        break
            except requests.RequestException:
                pass
            time.sleep(1)
        else:
            pytest.fail("entrypoint did not serve in 300 s")
        assert_schema(r.json())
        generated = read_properties(tmp_path / "config.properties")
        assert generated["inference_address"] == base and generated["model_store"] == str(store)
        assert generated["grpc_inference_address"] == "127.0.0.1"
        # the container's probes: standard library only (no torch import), against this server
        probe = [sys.executable, "-X", "importtime", str(ROOT / "scripts" / "probe.py"), "ready"]
        run = subprocess.run(probe, env=env, capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, run.stdout + run.stderr[-2000:]
        assert not re.search(r"\| +(torch|requests|numpy)$", run.stderr, re.M)
        assert_drains_on_sigterm(proc, base, probe, env, photos["coffee"])
    finally:
        if proc.poll() is None:  # the drain check failed before PID 1 exited
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def assert_drains_on_sigterm(proc, base: str, probe: list, env: dict, body: bytes) -> None:
    """What `docker stop` / a rolling update does to PID 1, with two clients standing in for a load
    balancer: readiness goes off at once; they keep sending for the drain (DRAIN_SECONDS, the time a
    balancer takes to drop the pod) and then stop starting new requests. Every request sent gets its
    200 (the ones in flight when the drain ends included: TorchServe is stopped only once idle), PID 1
    exits 0, and afterwards the port refuses connections."""
    import threading

    drain = float(env["DRAIN_SECONDS"])
    os.kill(proc.pid, signal.SIGTERM)  # PID 1 alone (entrypoint.sh exec'd serve.py foreground)
    t_term = time.monotonic()
    while subprocess.run(probe, env=env, capture_output=True).returncode == 0:
        assert time.monotonic() - t_term < 30, "readiness still on 30 s after SIGTERM"
        time.sleep(0.1)
    outcomes: list = []

    def client() -> None:
        s = requests.Session()
        while time.monotonic() - t_term < drain:
            try:
                outcomes.append(s.put(f"{base}/predictions/all", data=body, timeout=120).status_code)
            except requests.RequestException as exc:
                outcomes.append(repr(exc))

    threads = [threading.Thread(target=client, daemon=True) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert proc.wait(timeout=120) == 0
    assert outcomes and all(o == 200 for o in outcomes), [o for o in outcomes if o != 200]
    with pytest.raises(requests.ConnectionError):
        requests.put(f"{base}/predictions/all", data=body, timeout=30)


def manifests() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs.append((path.name, doc))
    return docs


def test_kubernetes_manifests_validate_against_the_schema():
    import kubernetes_validate

    checked = 0
    for _name, doc in manifests():
        if doc["apiVersion"].startswith(("serving.kserve.io", "kustomize.config.k8s.io", "ray.io")):
            continue  # CRD-defined kinds: checked field by field below
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        checked += 1
    assert checked == 6  # two Deployments, Service, HPA, two NetworkPolicies


def test_manifests_match_config_properties():
    props = read_properties(ROOT / "config.properties")
    port = {k: int(props[f"{k}_address"].rsplit(":", 1)[1]) for k in ("inference", "management", "metrics")}
    exposed = {k: port[k] for k in ("inference", "metrics")}  # management: loopback in the pod
    docs = {d["metadata"]["name"] + "/" + d["kind"]: d for _, d in manifests() if "metadata" in d}
    for name in ("multidet/Deployment", "multidet-gpu/Deployment"):
        pod = docs[name]["spec"]["template"]
        c = pod["spec"]["containers"][0]
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports == exposed
        assert c["livenessProbe"]["exec"]["command"] == ["python", "/app/scripts/probe.py", "live"]
        for probe in ("startupProbe", "readinessProbe"):  # /ping and a READY worker
            assert c[probe]["exec"]["command"] == ["python", "/app/scripts/probe.py", "ready"]
        assert {"name": "BIND", "value": "0.0.0.0"} in c["env"]
        assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(port["metrics"])
        assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
        assert c["resources"]["requests"]["cpu"] == c["resources"]["limits"]["cpu"]
    gpu = docs["multidet-gpu/Deployment"]["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert gpu["limits"]["nvidia.com/gpu"] == 1
    svc = docs["multidet/Service"]["spec"]
    assert {p["port"] for p in svc["ports"]} == {port["inference"], port["metrics"]}  # management not exposed
    hpa = docs["multidet/HorizontalPodAutoscaler"]["spec"]
    assert hpa["scaleTargetRef"]["name"] == "multidet" and hpa["minReplicas"] >= 1
    isvc = docs["multidet/InferenceService"]
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1"
    predictor = isvc["spec"]["predictor"]
    assert "model" not in predictor  # a custom predictor: the project's image, not KServe's TorchServe runtime
    (c,) = predictor["containers"]
    assert (
        c["name"] == "kserve-container"
        and c["image"] == docs["multidet/Deployment"]["spec"]["template"]["spec"]["containers"][0]["image"]
    )
    assert [p["containerPort"] for p in c["ports"]] == [port["inference"]]
    assert c["readinessProbe"]["exec"]["command"] == ["python", "/app/scripts/probe.py", "ready"]
    policy = docs["multidet/NetworkPolicy"]["spec"]
    own = {"app.kubernetes.io/name": "multidet", "multidet/front": "torchserve"}
    assert policy["podSelector"]["matchLabels"] == own
    opened = {p["port"] for rule in policy["ingress"] for p in rule["ports"]}
    assert opened == {port["inference"], port["metrics"]} and port["management"] not in opened
    assert "from" not in policy["ingress"][0] and policy["ingress"][0]["ports"] == [
        {"port": port["inference"], "protocol": "TCP"}
    ]  # inference from anywhere; metrics only from the monitoring namespace
    assert {"name": "BIND", "value": "0.0.0.0"} in c["env"]
    assert isvc["metadata"]["annotations"]["prometheus.kserve.io/port"] == str(port["metrics"])


# -- the network policies, read together with the pods they select ---------------------------------------------
NAMESPACE = {"kubernetes.io/metadata.name": "multidet"}  # where the manifests are applied (any name works alike)
ALL = frozenset({"all"})  # every port


def pod_templates() -> dict[str, dict]:
    """Every pod the manifests make: name -> {labels, ports} (Deployments' templates, the RayService's groups)."""
    pods = {}
    for _, doc in manifests():
        if doc.get("kind") == "Deployment":
            templates = {doc["metadata"]["name"]: doc["spec"]["template"]}
        elif doc.get("kind") == "RayService":
            cluster = doc["spec"]["rayClusterConfig"]
            templates = {"ray-head": cluster["headGroupSpec"]["template"]}
            templates.update({f"ray-{g['groupName']}": g["template"] for g in cluster["workerGroupSpecs"]})
        else:
            continue
        for name, t in templates.items():
            ports = {p["containerPort"] for c in t["spec"]["containers"] for p in c.get("ports", [])}
            pods[name] = {"labels": t["metadata"]["labels"], "ports": ports}
    return pods


def matches(selector: dict | None, labels: dict) -> bool:
    assert not (selector or {}).get("matchExpressions"), "only matchLabels are read here"
    return all(labels.get(k) == v for k, v in (selector or {}).get("matchLabels", {}).items())


def open_ports(policies: list[dict], pod: dict, source: dict) -> frozenset:
    """The ports of ``pod`` that ``source`` ({namespace: labels, pod: labels}) may reach under ``policies``
    (NetworkPolicy ingress: the union of every rule of every policy that selects the pod; a pod no policy
    selects is open)."""
    selecting = [p["spec"] for p in policies if matches(p["spec"]["podSelector"], pod["labels"])]
    if not selecting:
        return ALL
    opened: set = set()
    for spec in selecting:
        assert spec["policyTypes"] == ["Ingress"]
        for rule in spec.get("ingress", []):
            peers = rule.get("from")
            allowed = peers is None or any(
                (
                    matches(peer["namespaceSelector"], source["namespace"])
                    if "namespaceSelector" in peer
                    else source["namespace"] == NAMESPACE
                )
                and matches(peer.get("podSelector"), source["pod"])
                for peer in peers
            )
            if allowed:
                if "ports" not in rule:
                    return ALL
                opened |= {p["port"] for p in rule["ports"]}
    return frozenset(opened)


def test_network_policies_fit_each_front():
    """Each front's pods are selected by their own policy only; the Ray cluster's pods reach each other on every port
    (it forms: GCS, raylets, object managers pick ports at random); clients reach Serve's proxy (8000) and nothing
    else of Ray, the operator its dashboard and agents, Prometheus the metrics ports; TorchServe's pods as before."""
    policies = [d for _, d in manifests() if d.get("kind") == "NetworkPolicy"]
    pods = pod_templates()
    assert set(pods) == {"multidet", "multidet-gpu", "ray-head", "ray-cpu"}
    front = {name: p["labels"]["multidet/front"] for name, p in pods.items()}
    assert front == {"multidet": "torchserve", "multidet-gpu": "torchserve", "ray-head": "ray", "ray-cpu": "ray"}
    for policy in policies:  # one policy per front, selecting that front's pods only
        selected = {front[n] for n, p in pods.items() if matches(policy["spec"]["podSelector"], p["labels"])}
        assert len(selected) == 1, (policy["metadata"]["name"], selected)
    elsewhere = {"kubernetes.io/metadata.name": "elsewhere"}
    sources = {
        "a client anywhere": {"namespace": elsewhere, "pod": {}},
        "another pod here": {"namespace": NAMESPACE, "pod": {"app": "other"}},
        "a TorchServe pod": {"namespace": NAMESPACE, "pod": pods["multidet"]["labels"]},
        "a Ray pod": {"namespace": NAMESPACE, "pod": pods["ray-cpu"]["labels"]},
        "Prometheus": {"namespace": {"kubernetes.io/metadata.name": "monitoring"}, "pod": {}},
        "the KubeRay operator": {"namespace": {"kubernetes.io/metadata.name": "ray-system"}, "pod": {}},
    }
    want = {
        "torchserve": {
            "a client anywhere": {8080},
            "another pod here": {8080},
            "a TorchServe pod": {8080},
            "a Ray pod": {8080},
            "Prometheus": {8080, 8082},
            "the KubeRay operator": {8080},
        },
        "ray": {
            "a client anywhere": {8000},
            "another pod here": {8000},
            "a TorchServe pod": {8000},
            "a Ray pod": ALL,
            "Prometheus": {8000, 8080},
            "the KubeRay operator": {8000, 8265, 52365},
        },
    }
    for name, pod in pods.items():
        for who, source in sources.items():
            got = open_ports(policies, pod, source)
            expected = want[front[name]][who]
            assert got == (expected if expected is ALL else frozenset(expected)), (name, who, sorted(got))
    # the ports each pod listens on: GCS and dashboard only for the cluster itself (and the operator's 8265)
    assert {6379, 8265, 8000, 8080} <= pods["ray-head"]["ports"]
    assert pods["multidet"]["ports"] == {8080, 8082}
    # the TorchServe Service routes to TorchServe's pods only (KubeRay makes the Ray cluster's Services)
    (svc,) = [d for _, d in manifests() if d.get("kind") == "Service"]
    assert {front[n] for n, p in pods.items() if matches({"matchLabels": svc["spec"]["selector"]}, p["labels"])} == {
        "torchserve"
    }


def test_rayservice_pods_validate_and_its_serve_config_builds():
    """The KubeRay RayService: its head and worker pod templates validate as Pods against the Kubernetes
    schema; its Serve config names the Ray front's builder with arguments RayFront accepts, for the model
    set and weights the image carries (/app), and places replicas only where their CPUs are."""
    import importlib

    import kubernetes_validate

    from multidet.ray_app import RayFront

    (svc,) = [d for _, d in manifests() if d.get("kind") == "RayService"]
    assert svc["apiVersion"] == "ray.io/v1"
    cluster = svc["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for group in groups:
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}, "spec": group["template"]["spec"]}
        kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
        (c,) = group["template"]["spec"]["containers"]
        assert c["image"] == "multidet:cpu" and c["resources"]["requests"] == c["resources"]["limits"]
        assert group["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
        assert {"name": "RAY_worker_niceness", "value": "0"} in c["env"]
    # closed: token authentication through the Secret (KubeRay sets RAY_AUTH_MODE and RAY_AUTH_TOKEN in every pod)
    assert cluster["authOptions"] == {"mode": "token", "secretName": "multidet-ray-auth"}
    assert tuple(int(v) for v in cluster["rayVersion"].split(".")) >= (2, 52)
    serve_config = yaml.safe_load(svc["spec"]["serveConfigV2"])
    (app,) = serve_config["applications"]
    module, name = app["import_path"].split(":")
    assert callable(getattr(importlib.import_module(module), name))
    front = RayFront.from_mapping(app["args"])
    assert front.model_set == "/app/models.yaml" and (ROOT / "models.yaml").exists()  # the Dockerfile copies it
    assert serve_config["http_options"]["port"] == 8000
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # no replica on the head
    for worker in cluster["workerGroupSpecs"]:
        cpus = float(worker["rayStartParams"]["num-cpus"])
        limit = float(worker["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])
        assert front.num_cpus <= cpus <= limit and front.torch_threads <= front.num_cpus


@pytest.mark.parametrize("path", ["/v1/models/all:predict", "/predictions/all"])
def test_kserve_v1_protocol_through_torchserve(server, photos, path):
    """KServe's v1 protocol, as the custom predictor container answers it: instances of base64, parsed by
    the project's own envelope (no TorchServe service_envelope), on KServe's path and on /predictions/all."""
    instances = [{"data": base64.b64encode(photos[n]).decode()} for n in ("coffee", "rocket")]
    instances[1] = {"b64": instances[1]["data"], "threshold": 0.0}  # KServe's binary form, own options
    r = requests.post(f"{server.inference}{path}", json={"instances": instances}, timeout=120)
    assert r.status_code == 200, r.text
    predictions = r.json()["predictions"]
    assert len(predictions) == 2
    for p in predictions:
        assert_schema(p)
    assert min(d["score"] for d in predictions[1]["detections"]) < 0.5  # its threshold 0 was applied
    assert all(d["score"] >= 0.5 for d in predictions[0]["detections"])
    bad = requests.post(
        f"{server.inference}{path}", json={"instances": instances[:1] + [{"data": "not base64 !"}]}, timeout=120
    )
    assert bad.status_code == 400 and "instance 1" in bad.json()["message"], bad.text  # not base64: malformed
    empty = requests.post(f"{server.inference}{path}", json={"instances": []}, timeout=60)
    assert empty.status_code == 400 and "instances" in empty.json()["message"]
    other = requests.post(f"{server.inference}{path}", json={"image": "x"}, timeout=60)
    assert other.status_code == 415 and "JSON" in other.json()["message"]
