"""The Kubernetes manifests (docker/k8s, the docker/k8s-secure overlay): rendered offline with
``kubectl kustomize`` (what ``kubectl apply -k`` sends), validated against the API schemas of the oldest
and newest Kubernetes we support (kubernetes-validate, strict: an unknown field fails), checked by a
policy checker (checkov, offline, in a private network namespace where possible) and against what
docs/kubernetes.md promises. Nothing here talks to a cluster."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from gossipfl.version import __version__

pytestmark = pytest.mark.timeout(120)
ROOT = Path(__file__).parent.parent
DOCKER = ROOT / "docker"
KUBE_VERSIONS = ("1.32", "1.37")  # the oldest we support (persistentVolumeClaimRetentionPolicy GA) and the newest
POD_LABELS = {"name", "instance", "version", "component", "part-of", "managed-by"}
SELECTOR = {"app.kubernetes.io/name": "gossipfl", "app.kubernetes.io/instance": "gossipfl"}

# checkov's checks that fail on the rendered manifests and stay failing, with the reason. The list is
# exact: a new failure fails the test, and so does an entry that no longer fails.
CHECKOV_EXCEPTIONS = {
    "CKV_K8S_21": "The default namespace: the manifests name no namespace, so that one base serves any; "
    "choose it at apply time (kubectl apply -n NS -k, or an overlay's namespace:), docs/kubernetes.md",
    "CKV_K8S_43": "Image digest: the image is built from this repository and loaded or pushed by the operator, "
    "so its digest is unknown here; pin it in an overlay (images: digest:), docs/kubernetes.md",
    "CKV_K8S_15": "imagePullPolicy Always: a locally loaded image (kind load, minikube image load) has no "
    "registry to pull from; the tag is the release's version, so IfNotPresent never runs a stale image",
}
DOC = (ROOT / "docs" / "kubernetes.md").read_text()


def doc_example(name: str) -> str:
    """The YAML block that follows ``<!-- k8s-example: NAME -->`` in docs/kubernetes.md."""
    (block,) = re.findall(rf"<!-- k8s-example: {name} -->\n```yaml\n(.*?)```", DOC, flags=re.S)
    return block


def kustomize(kubectl: str, folder: Path) -> list[dict]:
    out = subprocess.run([kubectl, "kustomize", str(folder)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.fixture(scope="module")
def kubectl():
    path = shutil.which("kubectl")
    if path is None:
        if os.environ.get("CI"):  # as for checkov: CI must not pass by skipping the manifests' checks
            pytest.fail("kubectl is not installed (it renders the kustomizations offline)")
        pytest.skip("kubectl is not installed")
    return path


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """A copy of docker/k8s and docker/k8s-secure (with a made-up key and token, which are git-ignored
    there) and the overlays of docs/kubernetes.md beside them."""
    tmp = tmp_path_factory.mktemp("k8s")
    shutil.copytree(DOCKER / "k8s", tmp / "k8s")
    shutil.copytree(
        DOCKER / "k8s-secure", tmp / "k8s-secure", ignore=shutil.ignore_patterns("cluster.key", "read-token")
    )
    (tmp / "k8s-secure" / "cluster.key").write_bytes(bytes(range(40, 72)))
    (tmp / "k8s-secure" / "read-token").write_text("tok")
    for name in ("blue", "storage", "registry"):  # the overlays of docs/kubernetes.md, as written there
        (tmp / f"k8s-{name}").mkdir()
        (tmp / f"k8s-{name}" / "kustomization.yaml").write_text(doc_example(name))
    return tmp


@pytest.fixture(scope="module")
def rendered(kubectl, tree):
    """Every variant, rendered once: name -> its documents."""
    variants = {"base": "k8s", "secure": "k8s-secure", **{n: f"k8s-{n}" for n in ("blue", "storage", "registry")}}
    return {name: kustomize(kubectl, tree / folder) for name, folder in variants.items()}


def one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    (found,) = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    return found


def pod_of(docs: list[dict]) -> tuple[dict, dict, dict]:
    """The StatefulSet, its pod spec and its one container."""
    sts = one(docs, "StatefulSet")
    pod = sts["spec"]["template"]["spec"]
    (node,) = pod["containers"]
    return sts, pod, node


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container["env"]}


# --- schemas and policies ---------------------------------------------------------------------------


@pytest.mark.parametrize("version", KUBE_VERSIONS)
def test_every_rendered_document_is_valid_for_the_kubernetes_api(rendered, version):
    import kubernetes_validate

    for name, docs in rendered.items():
        assert {d["kind"] for d in docs} >= {"Service", "StatefulSet", "NetworkPolicy", "PodDisruptionBudget"}
        for doc in docs:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                pytest.fail(f"{name}: {doc['kind']} {doc['metadata']['name']}: {e.message} at {list(e.path)}")


def test_the_schema_check_catches_an_unknown_field(rendered):
    import kubernetes_validate

    sts = json.loads(json.dumps(one(rendered["base"], "StatefulSet")))
    sts["spec"]["template"]["spec"]["containers"][0]["securityContext"]["readOnlyRootFS"] = True  # a typo
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(sts, KUBE_VERSIONS[0], strict=True)


def checkov_command() -> list[str] | None:
    """checkov lives in a venv of its own (its pins would downgrade ours): $GOSSIPFL_CHECKOV, else
    <venv>/tools/checkov (scripts/setup.sh), else one on PATH."""
    candidates = [
        os.environ.get("GOSSIPFL_CHECKOV", ""),
        str(Path(sys.prefix) / "tools" / "checkov" / "bin" / "checkov"),
    ]
    found = next((c for c in candidates if c and os.access(c, os.X_OK)), None) or shutil.which("checkov")
    if found is None:
        return None
    # No traffic leaves this machine: no API key, no platform download, no update check; and as root, a
    # private network namespace with no interface but lo, so that nothing could.
    isolate = []
    if os.geteuid() == 0 and shutil.which("unshare"):
        if subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0:
            isolate = ["unshare", "-n"]
    return [*isolate, found]


@pytest.fixture(scope="module")
def checkov_report(rendered, tmp_path_factory):
    cmd = checkov_command()
    if cmd is None:
        if os.environ.get("CI"):
            pytest.fail("checkov is not installed (scripts/setup.sh puts it in .venv/tools/checkov)")
        pytest.skip("checkov is not installed (scripts/setup.sh puts it in .venv/tools/checkov)")
    tmp = tmp_path_factory.mktemp("checkov")
    files = []
    for name in ("base", "secure"):
        (tmp / f"{name}.yaml").write_text(yaml.safe_dump_all(rendered[name]))
        files += ["-f", str(tmp / f"{name}.yaml")]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BC_", "PRISMA_", "CKV_", "CHECKOV_"))}
    env.update(CKV_SKIP_PACKAGE_UPDATE_CHECK="true", BC_SKIP_MAPPING="TRUE", LOG_LEVEL="WARNING")
    start = time.monotonic()
    out = subprocess.run(
        [*cmd, *files, "--framework", "kubernetes", "--skip-download", "--compact", "-o", "json"],
        capture_output=True, text=True, env=env, cwd=tmp, timeout=100,
    )  # fmt: skip
    assert out.returncode in (0, 1), out.stderr  # 1: some check failed
    report = json.loads(out.stdout)
    reports = report if isinstance(report, list) else [report]
    (report,) = [r for r in reports if r.get("check_type") == "kubernetes"]
    print(f"checkov {report['summary']['checkov_version']}: {time.monotonic() - start:.1f} s, {report['summary']}")
    return report


def test_checkov_finds_nothing_but_the_listed_exceptions(rendered, checkov_report):
    summary = checkov_report["summary"]
    assert summary["parsing_errors"] == 0
    # it read every document, and the pod of each StatefulSet's template
    assert summary["resource_count"] == len(rendered["base"]) + len(rendered["secure"]) + 2
    results = checkov_report["results"]
    checked = {c["resource"].split(".")[0] for c in results["passed_checks"] + results["failed_checks"]}
    assert checked >= {"Pod", "StatefulSet", "Service", "Secret"} and summary["passed"] > 100
    failed: dict[str, list[str]] = {}
    for check in results["failed_checks"]:
        failed.setdefault(check["check_id"], []).append(f"{check['resource']}: {check['check_name']}")
    new = {k: v for k, v in failed.items() if k not in CHECKOV_EXCEPTIONS}
    assert new == {}, "fix these, or list them in CHECKOV_EXCEPTIONS with the reason"
    assert set(CHECKOV_EXCEPTIONS) - set(failed) == set(), "these pass now: remove them from CHECKOV_EXCEPTIONS"


# --- the pod ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["base", "secure"])
def test_the_pod_meets_the_restricted_pod_security_standard(rendered, variant):
    _, pod, node = pod_of(rendered[variant])
    ctx, cctx = pod["securityContext"], node["securityContext"]
    assert ctx["seccompProfile"] == {"type": "RuntimeDefault"}
    assert ctx["runAsNonRoot"] is True and (ctx["runAsUser"], ctx["runAsGroup"], ctx["fsGroup"]) == (10001,) * 3
    assert cctx["allowPrivilegeEscalation"] is False and cctx["capabilities"] == {"drop": ["ALL"]}
    assert cctx.get("privileged") is not True and "add" not in cctx["capabilities"]
    assert cctx["readOnlyRootFilesystem"] is True
    assert not {"hostNetwork", "hostPID", "hostIPC"} & {k for k, v in pod.items() if v}
    assert all("hostPath" not in v for v in pod["volumes"])
    assert pod["automountServiceAccountToken"] is False
    assert pod["enableServiceLinks"] is False  # a ClusterIP Service named gossipfl would set GOSSIPFL_PORT
    # the read-only root leaves writable: the state volume and /tmp
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in node["volumeMounts"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]
    assert mounts["/var/lib/gossipfl"] in {
        t["metadata"]["name"] for t in pod_of(rendered[variant])[0]["spec"]["volumeClaimTemplates"]
    }


def test_the_probes_give_a_slow_start_time_and_use_the_health_routes(rendered):
    _, pod, node = pod_of(rendered["base"])
    startup, live, ready = node["startupProbe"], node["livenessProbe"], node["readinessProbe"]
    assert startup["httpGet"]["path"] == live["httpGet"]["path"] == "/v2/health/live"
    assert ready["httpGet"]["path"] == "/v2/health/ready"
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120  # data, a checkpoint, 60 s for DNS
    assert "initialDelaySeconds" not in live  # the startup probe holds it back
    # SIGTERM: about 10 s for exchanges in flight (docs/liveness.md), then the last checkpoint
    assert pod["terminationGracePeriodSeconds"] >= 30


def test_the_image_is_tagged_with_the_package_version_in_one_place(rendered):
    kustomization = yaml.safe_load((DOCKER / "k8s" / "kustomization.yaml").read_text())
    (image,) = kustomization["images"]
    assert image["name"] == "gossipfl" and image["newTag"] == __version__, "release: set newTag in docker/k8s"
    for path in (DOCKER / "k8s").glob("*.yaml"):  # the manifests name the image without a tag
        images = re.findall(r"^\s*image:\s*(\S+)", path.read_text(), flags=re.M)
        assert set(images) <= {"gossipfl"}, path
    for variant, docs in rendered.items():
        sts, _, node = pod_of(docs)
        assert sts["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/version"] == __version__
        assert node["imagePullPolicy"] == "IfNotPresent"
        if variant == "registry":  # docs/kubernetes.md's overlay for a registry keeps the tag
            assert node["image"] == f"registry.example.com:5000/ml/gossipfl:{__version__}"
        else:
            assert node["image"] == f"gossipfl:{__version__}"


def test_a_new_version_changes_only_what_a_statefulset_update_may_change(kubectl, tree, rendered, tmp_path):
    """`kubectl apply -k` of the next release must be accepted: a StatefulSet's selector and volume claim
    templates are immutable, so the version (image tag, version label) must stay out of them."""
    shutil.copytree(tree / "k8s", tmp_path / "k8s")
    path = tmp_path / "k8s" / "kustomization.yaml"
    path.write_text(path.read_text().replace(f'newTag: "{__version__}"', 'newTag: "99.0.0"'))
    old, new = one(rendered["base"], "StatefulSet"), one(kustomize(kubectl, tmp_path / "k8s"), "StatefulSet")
    assert new["spec"]["template"]["spec"]["containers"][0]["image"] == "gossipfl:99.0.0"
    mutable = {"replicas", "template", "updateStrategy", "persistentVolumeClaimRetentionPolicy", "minReadySeconds"}
    assert {k: v for k, v in old["spec"].items() if k not in mutable} == {
        k: v for k, v in new["spec"].items() if k not in mutable
    }


def test_the_pods_carry_the_recommended_labels_and_are_selected_by_name_and_instance(rendered):
    docs = rendered["base"]
    sts, pod, _ = pod_of(docs)
    labels = sts["spec"]["template"]["metadata"]["labels"]
    assert {k.removeprefix("app.kubernetes.io/") for k in labels} >= POD_LABELS
    assert labels["app.kubernetes.io/component"] == "node"
    selectors = [
        sts["spec"]["selector"]["matchLabels"],
        one(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
        one(docs, "NetworkPolicy")["spec"]["podSelector"]["matchLabels"],
        *(s["spec"]["selector"] for s in docs if s["kind"] == "Service"),
        *(c["labelSelector"]["matchLabels"] for c in pod["topologySpreadConstraints"]),
    ]
    assert all(s == SELECTOR for s in selectors), selectors
    assert all(labels[k] == v for k, v in SELECTOR.items())


@pytest.mark.parametrize("variant", ["base", "blue"])
def test_the_cluster_name_and_the_discovery_name_follow_the_instance(rendered, variant):
    """Two instances in one namespace: each gossips only within itself, and finds its own pods."""
    docs = rendered[variant]
    sts, _, node = pod_of(docs)
    instance = sts["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/instance"]
    env = env_of(node)
    names = list(env)
    assert env["GOSSIPFL_CLUSTER"]["valueFrom"]["fieldRef"]["fieldPath"] == (
        "metadata.labels['app.kubernetes.io/instance']"
    )
    # $(VAR) expands only variables defined above it
    assert env["GOSSIPFL_DNS_NAME"]["value"] == "$(GOSSIPFL_CLUSTER).$(POD_NAMESPACE).svc.cluster.local"
    assert names.index("GOSSIPFL_CLUSTER") < names.index("GOSSIPFL_DNS_NAME")
    assert names.index("POD_NAMESPACE") < names.index("GOSSIPFL_DNS_NAME")
    assert names.index("POD_NAME") < names.index("GOSSIPFL_ID") and env["GOSSIPFL_ID"]["value"] == "$(POD_NAME)"
    headless = one(docs, "Service", instance)  # the DNS name's first label is the headless Service
    assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["publishNotReadyAddresses"] is True
    assert sts["spec"]["serviceName"] == instance
    assert headless["spec"]["selector"]["app.kubernetes.io/instance"] == instance
    assert env["GOSSIPFL_DISCOVERY"]["value"] == "dns"
    assert env["GOSSIPFL_PARTITION"]["value"] == f"auto/{sts['spec']['replicas']}"


def expanded_env(sts: dict, ordinal: int, namespace: str) -> dict[str, str]:
    """The container's environment as the kubelet makes it: fieldRefs filled in, and $(VAR) expanded
    from the variables above it (the image's own GOSSIPFL_HOST and GOSSIPFL_PORT left out)."""
    template = sts["spec"]["template"]
    fields = {"metadata.name": f"{sts['metadata']['name']}-{ordinal}", "metadata.namespace": namespace}
    fields |= {f"metadata.labels['{k}']": v for k, v in template["metadata"]["labels"].items()}
    env: dict[str, str] = {}
    for e in template["spec"]["containers"][0]["env"]:
        if "valueFrom" in e:
            env[e["name"]] = fields[e["valueFrom"]["fieldRef"]["fieldPath"]]
        else:
            env[e["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env.get(m[1], m[0]), e["value"])
    return env


@pytest.mark.parametrize("variant", ["base", "secure", "blue"])
def test_the_pod_environment_is_a_valid_node_configuration(rendered, variant):
    from gossipfl.args import node_config_from_args

    sts = one(rendered[variant], "StatefulSet")
    env = expanded_env(sts, 3, "ml")
    config = node_config_from_args([], env=env)
    instance = sts["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/instance"]
    assert config.cluster == instance and config.id == f"{sts['metadata']['name']}-3"
    assert config.dns_name == f"{instance}.ml.svc.cluster.local"
    assert config.state_dir is not None and str(config.state_dir) == "/var/lib/gossipfl"


def test_a_second_instance_shares_no_pods_with_the_first(rendered):
    base, blue = rendered["base"], rendered["blue"]
    assert {(d["kind"], d["metadata"]["name"]) for d in base}.isdisjoint(
        (d["kind"], d["metadata"]["name"]) for d in blue
    )
    for docs, instance in ((base, "gossipfl"), (blue, "blue-gossipfl")):
        policy = one(docs, "NetworkPolicy")["spec"]
        gossip_in, clients_in = policy["ingress"]
        dns_out, gossip_out = policy["egress"]
        peers = {**SELECTOR, "app.kubernetes.io/instance": instance}
        assert policy["podSelector"]["matchLabels"] == peers
        assert gossip_in["from"] == [{"podSelector": {"matchLabels": peers}}] == gossip_out["to"]
        # the renamed instance's label must not leak into the selectors of kube-dns and of the clients
        assert "matchLabels" not in dns_out["to"][0]["podSelector"]
        assert "matchLabels" not in clients_in["from"][0]["podSelector"]
        for pdb in (d for d in docs if d["kind"] == "PodDisruptionBudget"):
            assert pdb["spec"]["selector"]["matchLabels"] == peers


# --- the network ------------------------------------------------------------------------------------


def test_the_network_policy_lets_in_gossip_and_labelled_clients_and_lets_out_dns_and_gossip(rendered):
    policy = one(rendered["base"], "NetworkPolicy")["spec"]
    assert set(policy["policyTypes"]) == {"Ingress", "Egress"}
    assert all(rule.get("from") for rule in policy["ingress"]) and all(rule.get("to") for rule in policy["egress"])
    gossip_in, clients_in = policy["ingress"]
    assert gossip_in["from"] == [{"podSelector": {"matchLabels": SELECTOR}}]
    assert clients_in["from"] == [
        {"podSelector": {"matchExpressions": [{"key": "gossipfl.io/client", "operator": "In", "values": ["true"]}]}}
    ]
    for rule in policy["ingress"]:
        assert rule["ports"] == [{"protocol": "TCP", "port": 8470}]
    dns_out, gossip_out = policy["egress"]
    assert dns_out["to"] == [
        {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
            "podSelector": {"matchExpressions": [{"key": "k8s-app", "operator": "In", "values": ["kube-dns"]}]},
        }
    ]
    assert sorted(p["protocol"] for p in dns_out["ports"]) == ["TCP", "UDP"]
    assert {p["port"] for p in dns_out["ports"]} == {53}
    assert gossip_out == {
        "to": [{"podSelector": {"matchLabels": SELECTOR}}],
        "ports": [{"protocol": "TCP", "port": 8470}],
    }
    _, _, node = pod_of(rendered["base"])
    assert [p["containerPort"] for p in node["ports"]] == [8470]


def test_inference_clients_reach_only_ready_pods_and_discovery_lists_all(rendered):
    docs = rendered["base"]
    headless, inference = one(docs, "Service", "gossipfl"), one(docs, "Service", "gossipfl-inference")
    assert headless["spec"]["publishNotReadyAddresses"] is True  # a pod is ready only after its first merge
    assert inference["spec"].get("type", "ClusterIP") == "ClusterIP" and inference["spec"].get("clusterIP") != "None"
    assert not inference["spec"].get("publishNotReadyAddresses")
    assert inference["spec"]["selector"] == SELECTOR
    assert [p["port"] for p in inference["spec"]["ports"]] == [8470]


# --- disruptions, scheduling, state -----------------------------------------------------------------


def test_disruptions_take_one_pod_at_a_time_and_pods_spread_over_hosts(rendered):
    docs = rendered["base"]
    sts, pod, _ = pod_of(docs)
    pdb = one(docs, "PodDisruptionBudget")["spec"]
    assert pdb["maxUnavailable"] == 1 and "minAvailable" not in pdb
    assert pdb["unhealthyPodEvictionPolicy"] == "AlwaysAllow"  # a pod that never got ready must not block a drain
    assert sts["spec"]["minReadySeconds"] >= 5
    assert sts["spec"]["updateStrategy"]["type"] == "RollingUpdate"
    assert "partition" not in sts["spec"]["updateStrategy"].get("rollingUpdate", {})
    (spread,) = pod["topologySpreadConstraints"]
    assert spread["topologyKey"] == "kubernetes.io/hostname"
    assert spread["whenUnsatisfiable"] == "ScheduleAnyway"  # a one-node dev cluster still runs every pod
    assert spread["maxSkew"] == 1


def test_checkpoints_live_on_a_retained_volume_per_pod(rendered):
    sts, _, node = pod_of(rendered["base"])
    env = env_of(node)
    assert env["GOSSIPFL_STATE_DIR"]["value"] == "/var/lib/gossipfl"
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert {m["name"]: m["mountPath"] for m in node["volumeMounts"]}[claim["metadata"]["name"]] == "/var/lib/gossipfl"
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert "storageClassName" not in claim["spec"]  # the cluster's default class; docs show the patch
    assert "app.kubernetes.io/version" not in claim["metadata"].get("labels", {})
    assert sts["spec"]["persistentVolumeClaimRetentionPolicy"] == {"whenDeleted": "Retain", "whenScaled": "Retain"}
    # docs/kubernetes.md's patch for a storage class
    (claim,) = one(rendered["storage"], "StatefulSet")["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["storageClassName"] and claim["spec"]["resources"]["requests"]["storage"]


# --- the secure overlay -----------------------------------------------------------------------------


def test_the_secure_kubernetes_overlay_mounts_a_secret_and_points_the_node_at_it(rendered):
    """docker/k8s-secure renders (kubectl kustomize, offline) into the StatefulSet with the Secret mounted."""
    docs = rendered["secure"]
    secret = one(docs, "Secret")
    _, pod, node = pod_of(docs)
    assert set(secret["data"]) == {"cluster.key", "read-token"}
    env = {e["name"]: e.get("value") for e in node["env"]}
    assert env["GOSSIPFL_SECRET_FILE"] == "/run/secrets/gossipfl/cluster.key"
    assert env["GOSSIPFL_READ_TOKEN_FILE"] == "/run/secrets/gossipfl/read-token"
    mount = {m["name"]: m for m in node["volumeMounts"]}["secrets"]
    assert mount["readOnly"] and mount["mountPath"] == "/run/secrets/gossipfl"
    volume = {v["name"]: v for v in pod["volumes"]}["secrets"]
    assert volume["secret"]["secretName"] == secret["metadata"]["name"]
    assert volume["secret"]["defaultMode"] == 0o440  # root:fsGroup, read by the node's group
    assert node["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"  # open without the token
    # the overlay keeps everything of the base
    base_sts, secure_sts = one(rendered["base"], "StatefulSet"), one(docs, "StatefulSet")
    base_pod = base_sts["spec"]["template"]["spec"]
    assert {v["name"] for v in pod["volumes"]} == {v["name"] for v in base_pod["volumes"]} | {"secrets"}
    assert [d for d in docs if d["kind"] != "Secret" and d["kind"] != "StatefulSet"] == [
        d for d in rendered["base"] if d["kind"] != "StatefulSet"
    ]
    assert secure_sts["spec"]["volumeClaimTemplates"] == base_sts["spec"]["volumeClaimTemplates"]
