"""Tests of `python -m launch k8s` and the manifests under k8s/, with no cluster.

Golden files hold the `--dry-run` output of the invocations in INVOCATIONS (the ones docs/gke.md
uses; `JAXJOB_UPDATE_GOLDENS=1 pytest tests/test_k8s.py` rewrites them). The real `kubectl
kustomize` builds every directory offline and must agree with the launcher's reader; every rendered
object validates against the Kubernetes OpenAPI schemas (kubernetes-validate, strict) and the JobSet
against its CRD; invariants, the exit-code policy and Pod Security are checked on the parsed
objects; a fake `kubectl` on PATH receives the real argv of apply, status, wait, logs and delete;
hostile names and arguments are rejected before any command runs or stay one argv element / one
YAML scalar; and the rendered Job's command and env, run as 2 local processes, train (slow).
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shlex
import socket
import subprocess
import sys

import jsonschema
import kubernetes_validate
import pytest
import yaml

from launch import __main__ as launch_main
from launch import k8s, k8s_render
from tests.conftest import check_golden

ROOT = pathlib.Path(__file__).resolve().parent.parent
GOLDEN_DIR = ROOT / "tests" / "golden" / "k8s"
JOBSET_CRD = ROOT.parent / "shared" / "schemas" / "jobset.x-k8s.io_jobsets.yaml"
K8S_VERSIONS = ("1.31.0", "1.37.0")  # podFailurePolicy is GA from 1.31; the newest schemas.
REGISTRY = "us-central1-docker.pkg.dev/my-project/jaxjob/trainer"
BUCKET = "gs://my-project-jaxjob/runs"
CONFIG = "--config=trainer/configs/default.py"

_GPU = ["--name=gpu-demo", "--nodes=2", "--gpus-per-node=1", "--gpu-type=nvidia-l4",
        f"--image={REGISTRY}:cuda12", f"--workdir={BUCKET}/gpu-demo", "--", CONFIG]
_TPU = ["--name=tpu-demo", "--namespace=jaxjob-tpu", "--accelerator=tpu",
        "--tpu-accelerator=tpu-v5-lite-podslice", "--tpu-topology=4x4", "--tpus-per-node=4",
        "--nodes=4", f"--image={REGISTRY}:tpu", f"--workdir={BUCKET}/tpu-demo", "--", CONFIG]
# Every launch command of docs/gke.md; the goldens hold their --dry-run output.
INVOCATIONS = {
    "render-cpu": ["render", "--name=cpu-demo", "--nodes=2", f"--image={REGISTRY}:cpu",
                   f"--workdir={BUCKET}/cpu-demo", "--", CONFIG, "--config.train.steps=200"],
    "apply-gpu": ["apply", *_GPU],
    "apply-gpu-indexed": ["apply", "--indexed-job", *_GPU],
    "apply-gpu-wait": ["apply", "--wait", "--logs", "--delete", *_GPU],
    "apply-tpu": ["apply", *_TPU],
    "apply-tpu-indexed": ["apply", "--indexed-job", *_TPU],
    "apply-tpu-multislice": ["apply", "--num-slices=2", *_TPU],
    "logs-gpu": ["logs", "--name=gpu-demo", "--nodes=2"],
    "logs-gpu-follow": ["logs", "--name=gpu-demo", "--nodes=2", "--follow"],
    "logs-tpu": ["logs", "--name=tpu-demo", "--namespace=jaxjob-tpu", "--nodes=4"],
    "status-gpu": ["status", "--name=gpu-demo"],
    "wait-gpu": ["wait", "--name=gpu-demo"],
    "wait-tpu": ["wait", "--name=tpu-demo", "--namespace=jaxjob-tpu"],
    "delete-gpu": ["delete", "--name=gpu-demo"],
    "delete-gpu-indexed": ["delete", "--indexed-job", "--name=gpu-demo"],
    "delete-tpu": ["delete", "--name=tpu-demo", "--namespace=jaxjob-tpu"],
}
# Render flag sets covering every profile, for schema, invariant and security checks.
PROFILES = {
    "cpu": ["--nodes=2"],
    "gpu": ["--nodes=2", "--gpus-per-node=8"],
    "tpu": ["--accelerator=tpu", "--nodes=2"],
    "tpu-privileged": ["--accelerator=tpu", "--tpu-topology=4x4", "--nodes=4", "--tpu-privileged"],
    "tpu-pod-network": ["--accelerator=tpu", "--tpu-topology=4x4", "--nodes=4",
                        "--no-host-network"],
}


def launch(argv: list[str], capsys) -> tuple[int, str, str]:
  """Runs `python -m launch k8s ARGV` in-process; returns (exit code, stdout, stderr)."""
  try:
    code = launch_main.main(["k8s", *argv])
  except SystemExit as e:
    code = e.code
  out, err = capsys.readouterr()
  return code, out, err


def rendered(capsys, *flags: str, jobset: bool = False) -> list[dict]:
  argv = ["render", "--name=demo", f"--image={REGISTRY}:v1", f"--workdir={BUCKET}/demo", *flags]
  code, out, err = launch(argv + (["--jobset"] if jobset else ["--indexed-job"]), capsys)
  assert code == 0, err
  return list(yaml.safe_load_all(out))


def job_parts(docs: list[dict]) -> tuple[dict, dict, dict]:
  """(Job spec, pod spec, trainer container) of an Indexed Job or of the JobSet's one job."""
  (top,) = [d for d in docs if d["kind"] in ("Job", "JobSet")]
  spec = top["spec"]
  if top["kind"] == "JobSet":
    spec = spec["replicatedJobs"][0]["template"]["spec"]
  pod = spec["template"]["spec"]
  (container,) = [c for c in pod["containers"] if c["name"] == "trainer"]
  return spec, pod, container


def env_of(container: dict) -> dict:
  return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


# ---------------------------------------------------------------------------------------------
# Goldens and the walk-through.


@pytest.mark.parametrize("name", sorted(INVOCATIONS))
def test_dry_run_matches_golden(name, capsys, monkeypatch):
  monkeypatch.setattr(subprocess, "run", _no_subprocess)
  monkeypatch.setattr(subprocess, "Popen", _no_subprocess)
  code, out, err = launch(_with_dry_run(INVOCATIONS[name]), capsys)
  assert (code, err) == (0, "")
  check_golden(GOLDEN_DIR / f"{name}.txt", out)


def test_no_stale_goldens():
  assert {p.stem for p in GOLDEN_DIR.glob("*.txt")} == set(INVOCATIONS)


def _with_dry_run(argv: list[str]) -> list[str]:
  split = argv.index("--") if "--" in argv else len(argv)
  return argv[:split] + ["--dry-run"] + argv[split:]


def _no_subprocess(*args, **kwargs):
  raise AssertionError(f"a command ran: {args} {kwargs}")


def test_cli_entry_point_prints_the_golden():
  argv = _with_dry_run(INVOCATIONS["render-cpu"])
  proc = subprocess.run([sys.executable, "-m", "launch", "k8s", *argv], cwd=ROOT,
                        capture_output=True, text=True, check=False, timeout=60)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout == (GOLDEN_DIR / "render-cpu.txt").read_text()


def test_walkthrough_uses_only_tested_invocations():
  text = (ROOT / "docs" / "gke.md").read_text().replace("\\\n", " ")
  commands = [shlex.split(line)[4:] for line in text.splitlines()
              if line.strip().startswith("python -m launch k8s ")]
  tested = list(INVOCATIONS.values())
  assert len(commands) >= 10
  for argv in commands:
    assert argv in tested, f"docs/gke.md runs an untested command: {shlex.join(argv)}"
  verbs = {argv[0] for argv in commands}
  assert verbs == {"apply", "logs", "status", "wait", "delete", "render"}


def test_dry_run_apply_prints_argv_and_the_rendered_manifests(capsys):
  code, out, _ = launch(_with_dry_run(INVOCATIONS["apply-gpu"]), capsys)
  assert code == 0
  first, comment, *manifest = out.splitlines(keepends=True)
  assert first == "$ kubectl apply -f -\n" and comment.startswith("#")
  code, render_out, _ = launch(["render", *INVOCATIONS["apply-gpu"][1:]], capsys)
  assert code == 0 and "".join(manifest) == render_out


# ---------------------------------------------------------------------------------------------
# Real kubectl, schemas and invariants.


@pytest.mark.parametrize("directory", ["base", "overlays/gpu", "overlays/tpu-gke", "jobset"])
def test_kubectl_kustomize_builds_offline_and_agrees_with_the_launcher(directory, tmp_path):
  env = {**os.environ, "KUBECONFIG": str(tmp_path / "none")}
  proc = subprocess.run(["kubectl", "kustomize", str(k8s_render.K8S_DIR / directory)], env=env,
                        capture_output=True, text=True, check=False, timeout=60)
  assert proc.returncode == 0, proc.stderr
  by_kubectl = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(proc.stdout)}
  ours = {(d["kind"], d["metadata"]["name"]): d
          for d in k8s_render.kustomize(k8s_render.K8S_DIR / directory)}
  assert ours == by_kubectl


def test_patches_address_the_trainer_container():
  for patch in ("gpu/gpu.yaml", "tpu-gke/tpu.yaml"):
    for op in yaml.safe_load((k8s_render.K8S_DIR / "overlays" / patch).read_text()):
      if "/containers/" in op["path"]:
        assert op["path"].startswith("/spec/template/spec/containers/0/")
  _, pod, _ = job_parts(k8s_render.kustomize(k8s_render.K8S_DIR / "base"))
  assert pod["containers"][0]["name"] == "trainer"


def _strict(schema):
  """The CRD schema with unknown fields rejected (the API server would silently prune them)."""
  if isinstance(schema, dict):
    schema = {k: _strict(v) for k, v in schema.items()}
    if ("properties" in schema and "additionalProperties" not in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")):
      schema["additionalProperties"] = False
  elif isinstance(schema, list):
    schema = [_strict(v) for v in schema]
  return schema


@pytest.fixture(scope="module")
def jobset_validator():
  crd = yaml.safe_load(JOBSET_CRD.read_text())
  (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1alpha2"]
  return jsonschema.Draft7Validator(_strict(version["schema"]["openAPIV3Schema"]))


def validate(doc: dict, jobset_validator) -> None:
  if doc["kind"] == "JobSet":
    errors = [f"{list(e.path)}: {e.message}" for e in jobset_validator.iter_errors(doc)]
    assert not errors, errors[:5]
    # The embedded Job must also be a valid batch/v1 Job (its fields are checked by the API).
    for replicated in doc["spec"]["replicatedJobs"]:
      validate({"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "x"},
                 "spec": replicated["template"]["spec"]}, jobset_validator)
    return
  for version in K8S_VERSIONS:
    kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.parametrize("jobset", [False, True], ids=["job", "jobset"])
@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_rendered_objects_validate_against_schemas(profile, jobset, capsys, jobset_validator):
  docs = rendered(capsys, *PROFILES[profile], jobset=jobset)
  assert [d["kind"] for d in docs] == (["JobSet"] if jobset else ["Service", "Job"])
  for doc in docs:
    validate(doc, jobset_validator)


def test_schema_checks_can_fail(capsys, jobset_validator):
  docs = rendered(capsys, "--nodes=2")
  docs[1]["spec"]["template"]["spec"]["containers"][0]["bogusField"] = 1
  with pytest.raises(kubernetes_validate.ValidationError):
    validate(docs[1], jobset_validator)
  (jobset,) = rendered(capsys, "--nodes=2", jobset=True)
  jobset["spec"]["failurePolicy"]["rules"][0]["action"] = "RestartForever"
  with pytest.raises(AssertionError):
    validate(jobset, jobset_validator)


@pytest.mark.parametrize("jobset", [False, True], ids=["job", "jobset"])
@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_invariants(profile, jobset, capsys):
  docs = rendered(capsys, *PROFILES[profile], jobset=jobset)
  spec, pod, container = job_parts(docs)
  (nodes,) = [int(f.split("=")[1]) for f in PROFILES[profile] if f.startswith("--nodes=")]
  assert spec["completionMode"] == "Indexed"
  assert spec["completions"] == spec["parallelism"] == nodes
  assert pod["restartPolicy"] == "Never"
  assert container["command"] == ["python", "-m", "trainer"]
  assert container["args"][-1] == f"--workdir={BUCKET}/demo"
  assert pod["terminationGracePeriodSeconds"] >= 15  # GKE Spot's pod share of the notice.
  env = env_of(container)
  assert env["JAX_NUM_PROCESSES"] == str(nodes)
  assert env["JAX_PROCESS_ID"] == {"fieldRef": {
      "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}
  host, port = env["JAX_COORDINATOR_ADDRESS"].rsplit(":", 1)
  if jobset:
    network = docs[0]["spec"]["network"]
    assert network["enableDNSHostnames"] and network["publishNotReadyAddresses"]
    assert "subdomain" not in pod and port == "8482"
    assert host == f"demo-{docs[0]['spec']['replicatedJobs'][0]['name']}-0-0.{network['subdomain']}"
  else:
    service, job = docs
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"]
    assert service["spec"]["selector"] == {"batch.kubernetes.io/job-name": job["metadata"]["name"]}
    assert pod["subdomain"] == service["metadata"]["name"]
    assert host == f"{job['metadata']['name']}-0.{service['metadata']['name']}"
    assert int(port) == service["spec"]["ports"][0]["port"]
  for doc in docs:
    assert doc["metadata"]["namespace"] == "jaxjob"
  # The image's compilation cache directory is writable (tests/test_dockerfile.py checks the path).
  volumes = {v["name"]: v for v in pod["volumes"]}
  (cache,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/var/cache/jaxjob"]
  assert "emptyDir" in volumes[cache["name"]] and not cache.get("readOnly")


def test_gpu_and_tpu_scheduling(capsys):
  _, pod, container = job_parts(rendered(capsys, "--nodes=2", "--gpus-per-node=4",
                                         "--gpu-type=nvidia-l4"))
  assert container["resources"]["limits"]["nvidia.com/gpu"] == 4
  assert pod["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-l4"}
  assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists",
                                 "effect": "NoSchedule"}]
  _, pod, container = job_parts(rendered(
      capsys, "--tpu-accelerator=tpu-v6e-slice", "--tpu-topology=2x2x4", "--tpus-per-node=4",
      "--nodes=4"))
  assert container["resources"]["limits"]["google.com/tpu"] == 4
  assert pod["nodeSelector"] == {"cloud.google.com/gke-tpu-accelerator": "tpu-v6e-slice",
                                 "cloud.google.com/gke-tpu-topology": "2x2x4"}
  assert pod["tolerations"] == [{"key": "google.com/tpu", "operator": "Exists",
                                 "effect": "NoSchedule"}]


@pytest.mark.parametrize("flags, message", [
    (["--accelerator=tpu", "--tpu-topology=4x4", "--nodes=2"], "expected --nodes=4"),
    (["--gpus-per-node=8", "--tpu-topology=4x4"], "--tpu-topology does not apply"),
    (["--accelerator=cpu", "--gpus-per-node=8"], "--gpus-per-node does not apply"),
    (["--gpus-per-node=0"], "--gpus-per-node=0"),
    (["--nodes=0"], "--nodes=0"),
    (["--tpu-topology=4x4; id"], "--tpu-topology"),
    (["--workdir=/tmp/run"], "expected gs://"),
    (["--", CONFIG, "--workdir=gs://other/x"], "launcher's --workdir"),
])
def test_inconsistent_flags_exit_2(flags, message, capsys):
  argv = ["apply", "--name=demo", f"--image={REGISTRY}:v1", f"--workdir={BUCKET}/demo", *flags]
  code, out, err = launch(argv, capsys)
  assert code == 2 and out == ""
  assert message in err and len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------------------
# Exit-code contract (reliability test R13).


def pod_failure_action(policy: dict, exit_code: int, conditions=()) -> tuple[str, str]:
  """Kubernetes' podFailurePolicy evaluation: the first matching rule wins, else Count."""
  for index, rule in enumerate(policy["rules"]):
    on_codes, on_conditions = rule.get("onExitCodes"), rule.get("onPodConditions", [])
    if on_codes and exit_code and on_codes["containerName"] == "trainer" and (
        (exit_code in on_codes["values"]) == (on_codes["operator"] == "In")):
      return rule["action"], (f"Container trainer for pod ns/p failed with exit code {exit_code}"
                              f" matching {rule['action']} rule at index {index}")
    for condition in on_conditions:
      if condition["type"] in conditions and condition.get("status", "True") == "True":
        return rule["action"], (f"Pod ns/p has condition {condition['type']} matching"
                                f" {rule['action']} rule at index {index}")
  return "Count", ""


def jobset_action(failure_policy: dict, reason: str, message: str) -> str:
  """JobSet's failurePolicy evaluation: the first rule matching reason and message wins."""
  for rule in failure_policy["rules"]:
    if reason in rule.get("onJobFailureReasons", [reason]) and (
        any(re.search(p, message) for p in rule.get("onJobFailureMessagePatterns", [".*"]))):
      return rule["action"]
  return "RestartJobSet"


CONTRACT = [  # (exit code, pod conditions, Job action, JobSet action)
    (1, (), "FailJob", "FailJobSet"),
    (2, (), "FailJob", "FailJobSet"),
    (3, (), "FailJob", "FailJobSet"),
    (42, (), "Count", "RestartJobSet"),
    (134, (), "Count", "RestartJobSet"),
    (137, (), "Count", "RestartJobSet"),
    (143, (), "Count", "RestartJobSet"),
    (143, ("DisruptionTarget",), "Ignore", "RestartJobSetAndIgnoreMaxRestarts"),
    (137, ("DisruptionTarget",), "Ignore", "RestartJobSetAndIgnoreMaxRestarts"),
]


@pytest.mark.parametrize("exit_code, conditions, job_action, jobset_expected", CONTRACT)
def test_exit_code_policy(exit_code, conditions, job_action, jobset_expected, capsys):
  spec, _, _ = job_parts(rendered(capsys, "--nodes=2", "--max-restarts=5"))
  assert pod_failure_action(spec["podFailurePolicy"], exit_code, conditions)[0] == job_action
  assert spec["backoffLimit"] == 5 * 2  # Each gang restart fails up to one pod per node.
  (jobset,) = rendered(capsys, "--nodes=2", "--max-restarts=5", jobset=True)
  spec, _, _ = job_parts([jobset])
  action, message = pod_failure_action(spec["podFailurePolicy"], exit_code, conditions)
  if action == "Count":  # backoffLimit 0: the first counted failure fails the Job.
    assert spec["backoffLimit"] == 0
    reason = "BackoffLimitExceeded"
  else:
    assert action == "FailJob"
    reason = "PodFailurePolicy"
  assert jobset_action(jobset["spec"]["failurePolicy"], reason, message) == jobset_expected
  assert jobset["spec"]["failurePolicy"]["maxRestarts"] == 5


# ---------------------------------------------------------------------------------------------
# Security (reliability tests S1, S2, S3).


def pss_violations(pod: dict) -> set[str]:
  """Pod Security "restricted" controls (plus read-only root) that `pod` breaks."""
  found = {f for f in ("hostNetwork", "hostPID", "hostIPC") if pod.get(f)}
  pod_context = pod.get("securityContext", {})
  volumes = {v["name"]: v for v in pod.get("volumes", [])}
  allowed = {"name", "emptyDir", "configMap", "projected", "downwardAPI", "ephemeral",
             "persistentVolumeClaim", "csi"}
  found |= {"volumeType" for v in volumes.values() if set(v) - allowed}
  for container in pod["containers"] + pod.get("initContainers", []):
    context = {**pod_context, **container.get("securityContext", {})}
    checks = {
        "privileged": not context.get("privileged", False),
        "allowPrivilegeEscalation": context.get("allowPrivilegeEscalation") is False,
        "runAsNonRoot": context.get("runAsNonRoot") is True and context.get("runAsUser", 1) > 0,
        "capabilities": "ALL" in context.get("capabilities", {}).get("drop", [])
                        and not context.get("capabilities", {}).get("add"),
        "seccompProfile": context.get("seccompProfile", {}).get("type") in ("RuntimeDefault",
                                                                            "Localhost"),
        "readOnlyRootFilesystem": context.get("readOnlyRootFilesystem") is True,
        "hostPort": not any(p.get("hostPort") for p in container.get("ports", [])),
        "tmpIsEmptyDir": any(m["mountPath"] == "/tmp" and "emptyDir" in volumes[m["name"]]
                             for m in container.get("volumeMounts", [])),
    }
    found |= {name for name, ok in checks.items() if not ok}
  return found


# The TPU allow-list documented in k8s/overlays/tpu-gke/tpu.yaml and docs/gke.md.
ALLOWED = {"cpu": set(), "gpu": set(), "tpu": {"hostNetwork"}, "tpu-pod-network": set(),
           "tpu-privileged": {"hostNetwork", "privileged", "allowPrivilegeEscalation"}}


@pytest.mark.parametrize("jobset", [False, True], ids=["job", "jobset"])
@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_pod_security(profile, jobset, capsys):
  docs = rendered(capsys, *PROFILES[profile], "--service-account=trainer-ksa", jobset=jobset)
  _, pod, _ = job_parts(docs)
  assert pss_violations(pod) == ALLOWED[profile]
  assert pod["serviceAccountName"] == "trainer-ksa"
  assert pod["automountServiceAccountToken"] is False
  if "hostNetwork" in ALLOWED[profile]:
    assert pod["dnsPolicy"] == "ClusterFirstWithHostNet"


@pytest.mark.parametrize("mutation", [
    lambda pod: pod["securityContext"].update(runAsUser=0),
    lambda pod: pod["containers"][0]["securityContext"].update(allowPrivilegeEscalation=True),
    lambda pod: pod["containers"][0]["securityContext"]["capabilities"].update(add=["NET_ADMIN"]),
    lambda pod: pod["securityContext"].pop("seccompProfile"),
    lambda pod: pod["volumes"].append({"name": "h", "hostPath": {"path": "/"}}),
    lambda pod: pod["containers"][0]["volumeMounts"].clear(),
    lambda pod: pod.update(hostPID=True),
])
def test_pod_security_check_can_fail(mutation, capsys):
  _, pod, _ = job_parts(rendered(capsys, "--nodes=2"))
  mutation(pod)
  assert pss_violations(pod)


def test_no_long_lived_credentials(capsys):
  texts = [(ROOT / "Dockerfile").read_text(), (ROOT / "launch" / "k8s.py").read_text()]
  texts += [p.read_text() for p in k8s_render.K8S_DIR.rglob("*.yaml")]
  for profile, flags in PROFILES.items():
    for jobset in (False, True):
      docs = rendered(capsys, *flags, jobset=jobset)
      texts.append(k8s_render.dump(docs))
      _, pod, container = job_parts(docs)
      assert not [v for v in pod.get("volumes", []) if "secret" in v or "projected" in v]
      assert not [e for e in container["env"] if "secretKeyRef" in e.get("valueFrom", {})]
  for text in texts:
    assert not re.search(r"GOOGLE_APPLICATION_CREDENTIALS|private_key|BEGIN [A-Z ]*PRIVATE", text)


# ---------------------------------------------------------------------------------------------
# Injection (reliability test S5).

# Rejected in any value: shell metacharacters, quotes, whitespace, YAML, a Cyrillic look-alike.
HOSTILE = ["; rm -rf ~", "$(id)", "`id`", "a'b", 'a"b', "x\n  privileged: true", "j\u0430xjob",
           "a b", "a\tb", "{a: 1}"]
# Also rejected in names (RFC 1123 labels), though harmless inside a path or an image reference.
HOSTILE_NAMES = HOSTILE + ["--help", "a" * 64, "UPPER", "-leading", "trailing-", "a/b", "a.b", ""]
NAME_FLAGS = ["--name", "--namespace", "--service-account", "--gpu-type", "--tpu-accelerator",
              "--tpu-topology"]


@pytest.mark.parametrize("flag, value", [(f, v) for f in NAME_FLAGS for v in HOSTILE_NAMES]
                         + [(f, v) for f in ("--image", "--workdir") for v in HOSTILE])
def test_hostile_values_are_rejected_before_any_command(flag, value, capsys, monkeypatch):
  if flag == "--workdir":
    value = f"{BUCKET}/{value}"
  if flag == "--image":
    value = f"{REGISTRY}:{value}"
  monkeypatch.setattr(subprocess, "run", _no_subprocess)
  monkeypatch.setattr(subprocess, "Popen", _no_subprocess)
  flags = {"--name": "demo", "--image": f"{REGISTRY}:v1", "--workdir": f"{BUCKET}/demo"}
  flags[flag] = value
  if flag in ("--tpu-topology", "--tpu-accelerator"):
    flags["--accelerator"] = "tpu"
  argv = ["apply"] + [f"{k}={v}" for k, v in flags.items()]
  code, out, err = launch(argv, capsys)
  assert code == 2 and out == "", (argv, out)
  assert flag in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("verb", ["logs", "status", "wait", "delete"])
def test_hostile_names_rejected_by_every_verb(verb, capsys, monkeypatch):
  monkeypatch.setattr(subprocess, "run", _no_subprocess)
  monkeypatch.setattr(subprocess, "Popen", _no_subprocess)
  for value in HOSTILE_NAMES:
    extra = ["--nodes=2"] if verb == "logs" else []
    code, out, _ = launch([verb, f"--name={value}", *extra], capsys)
    assert code == 2 and out == ""


def test_hostile_trainer_args_are_one_yaml_scalar_each(capsys, monkeypatch):
  hostile = ["--config.x=; rm -rf ~", "$(id)", "`id`", "it's", 'say "hi"',
             "key: value", "- item", "{a: 1}", "&anchor *ref", "--config.name=\u2603 space",
             "#comment", "---", "!!python/object:os.system", "--config.s=a: b\u2028c"]
  calls = []

  def fake_run(argv, **kwargs):
    calls.append((argv, kwargs))
    return subprocess.CompletedProcess(argv, 0)

  monkeypatch.setattr(subprocess, "run", fake_run)
  argv = ["apply", "--name=demo", f"--image={REGISTRY}:v1", f"--workdir={BUCKET}/demo", "--"]
  code, _, err = launch(argv + hostile, capsys)
  assert code == 0, err
  ((command, kwargs),) = calls
  assert command == ["kubectl", "apply", "-f", "-"] and "shell" not in kwargs
  docs = list(yaml.safe_load_all(kwargs["input"]))
  _, _, container = job_parts(docs)
  assert container["args"] == hostile + [f"--workdir={BUCKET}/demo"]
  # No key appeared that the template does not have (YAML-injection check).
  plain = list(yaml.safe_load_all(launch(["render", *argv[1:-1]], capsys)[1]))
  assert _key_paths(docs) == _key_paths(plain)


def _key_paths(node, prefix=()) -> set:
  if isinstance(node, dict):
    return {p for k, v in node.items() for p in _key_paths(v, prefix + (k,))} | {prefix}
  if isinstance(node, list):
    return {p for v in node for p in _key_paths(v, prefix + ("[]",))} | {prefix}
  return {prefix}


def test_no_shell_anywhere():
  for path in sorted((ROOT / "launch").glob("*.py")):
    source = path.read_text()
    assert "shell=True" not in source and "os.system" not in source and "os.popen" not in source


# ---------------------------------------------------------------------------------------------
# The verbs against a fake kubectl on PATH (real subprocesses, real argv).

FAKE_KUBECTL = r'''
import json, os, pathlib, re, sys
state = pathlib.Path(os.environ["FAKE_KUBECTL_DIR"])
argv = sys.argv[1:]
with open(state / "calls.jsonl", "a") as f:
  f.write(json.dumps(argv) + "\n")
if argv[0] == "apply":
  (state / "applied.yaml").write_text(sys.stdin.read())
  print("job.batch/demo created")
elif argv[:2] == ["get", "pods"]:
  print((state / "pods.json").read_text())
elif argv[:2] == ["get", "job"] and argv[-2:] == ["-o", "name"]:  # which kind is NAME
  kind = state / "kind"
  if kind.exists() and kind.read_text() == "job":
    print(f"job.batch/{argv[2]}")
elif argv[0] == "get":
  counter = state / "counter"
  n = int(counter.read_text()) if counter.exists() else 0
  counter.write_text(str(n + 1))
  states = json.loads((state / "job.json").read_text())
  if states[min(n, len(states) - 1)] is None:  # an API error
    sys.exit("The connection to the server was refused")
  print(json.dumps(states[min(n, len(states) - 1)]))
elif argv[0] == "logs":
  pod = argv[3]
  log = state / f"logs-{pod}.txt"
  if not log.exists():
    print(f"error: container trainer in pod {pod} is waiting to start", file=sys.stderr)
    sys.exit(1)
  sys.stdout.write(log.read_text())
elif argv[0] == "delete":
  print(f"{argv[1]} {argv[2]} deleted")
'''


@pytest.fixture
def fake_kubectl(tmp_path, monkeypatch):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  script = bin_dir / "kubectl"
  script.write_text(f"#!{sys.executable}\n{FAKE_KUBECTL}")
  script.chmod(0o755)
  state = tmp_path / "state"
  state.mkdir()
  monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
  monkeypatch.setenv("FAKE_KUBECTL_DIR", str(state))
  (state / "kind").write_text("job")  # An Indexed Job of the asked name exists.
  return state


def _calls(state, with_kind_check: bool = False) -> list[list[str]]:
  """The fake's argv log; without `with_kind_check`, less the verbs' `get job NAME -o name`."""
  calls = [json.loads(line) for line in (state / "calls.jsonl").read_text().splitlines()]
  return [c for c in calls if with_kind_check or c[:2] != ["get", "job"] or c[-1] != "name"]


def test_missing_kubectl_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
  monkeypatch.setenv("PATH", str(tmp_path))
  code, out, err = launch(INVOCATIONS["apply-gpu"], capsys)
  assert (code, out) == (2, "")
  assert err == "error: kubectl is not on PATH: install it, or use --dry-run\n"
  assert launch(_with_dry_run(INVOCATIONS["apply-gpu"]), capsys)[0] == 0


def test_apply_pipes_the_rendered_manifests(fake_kubectl, capsys):
  code, out, _ = launch(INVOCATIONS["apply-gpu"], capsys)
  assert code == 0 and out.startswith("+ kubectl apply -f -\n")
  assert _calls(fake_kubectl) == [["apply", "-f", "-"]]
  _, render_out, _ = launch(["render", *INVOCATIONS["apply-gpu"][1:]], capsys)
  assert (fake_kubectl / "applied.yaml").read_text() == render_out


def _job(condition=None, message="", **status):
  conditions = [{"type": condition, "status": "True", "reason": "R", "message": message}]
  return {"status": {**status, "conditions": conditions if condition else []}}


def _pod(exit_code, finished="2026-01-01T00:00:00Z"):
  terminated = {"exitCode": exit_code, "finishedAt": finished}
  statuses = [{"name": "trainer", "state": {"terminated": terminated}}]
  return {"status": {"containerStatuses": statuses}}


@pytest.mark.parametrize("job, pods, expected", [
    (_job("Complete"), [_pod(0)], 0),
    (_job("Failed", "Container trainer for pod jaxjob/gpu-demo-1-x failed with exit code 3"
          " matching FailJob rule at index 1"), [_pod(3)], 3),
    (_job("Failed", "Job has reached the specified backoff limit"),
     [_pod(42, "2026-01-01T00:00:01Z"), _pod(143, "2026-01-01T00:00:02Z")], 143),
    (_job("Failed", "jobset failed"), [_pod(134), _pod(2)], 2),
    (_job("Failed", "no pods left"), [], 1),
    (_job(None, active=2, ready=1), [], k8s.STILL_RUNNING),
    ({"status": {"replicatedJobsStatus": [{"name": "workers", "active": 1}], "restarts": 2}}, [],
     k8s.STILL_RUNNING),
])
def test_status_exit_code_is_the_outcome(job, pods, expected, fake_kubectl, capsys):
  (fake_kubectl / "job.json").write_text(json.dumps([job]))
  (fake_kubectl / "pods.json").write_text(json.dumps({"items": pods}))
  code, out, _ = launch(["status", "--name=gpu-demo"], capsys)
  assert code == expected, out
  assert _calls(fake_kubectl) == [
      ["get", "job", "gpu-demo", "-n", "jaxjob", "-o", "json"],
      ["get", "pods", "-n", "jaxjob", "-l", "batch.kubernetes.io/job-name=gpu-demo", "-o", "json"]]


def test_status_of_a_missing_job_fails(fake_kubectl, capsys):
  code, _, _ = launch(["status", "--name=gpu-demo"], capsys)  # no job.json: the fake crashes
  assert code not in (0, k8s.STILL_RUNNING)


def test_wait_polls_until_the_job_ends(fake_kubectl, capsys):
  states = [_job(None, active=2), _job(None, active=2), _job("Failed", "exit code 2")]
  (fake_kubectl / "job.json").write_text(json.dumps(states))
  (fake_kubectl / "pods.json").write_text(json.dumps({"items": []}))
  code, out, _ = launch(["wait", "--jobset", "--name=tpu-demo", "--poll-seconds=0.1"], capsys)
  assert code == 2
  gets = [c for c in _calls(fake_kubectl) if c[:2] == ["get", "jobset"]]
  assert len(gets) == 3 and out.count("+ kubectl") == 2  # argv echoed once
  assert "-l" in _calls(fake_kubectl)[1] and "jobset.sigs.k8s.io/jobset-name=tpu-demo" in (
      _calls(fake_kubectl)[1])


@pytest.mark.parametrize("states, expected, gets", [
    ([None, None, _job("Complete")], 0, 3),
    ([None, None, None, _job("Complete")], 1, 3),
])
def test_wait_rides_out_two_api_errors(states, expected, gets, fake_kubectl, capsys):
  (fake_kubectl / "pods.json").write_text(json.dumps({"items": []}))
  (fake_kubectl / "job.json").write_text(json.dumps(states))
  code, _, _ = launch(["wait", "--name=gpu-demo", "--poll-seconds=0.1"], capsys)
  assert code == expected
  assert len([c for c in _calls(fake_kubectl) if c[:2] == ["get", "job"]]) == gets


def test_wait_times_out_as_still_running(fake_kubectl, capsys):
  (fake_kubectl / "job.json").write_text(json.dumps([_job(None, active=1)]))
  (fake_kubectl / "pods.json").write_text(json.dumps({"items": []}))
  code, _, err = launch(["wait", "--name=gpu-demo", "--timeout=1", "--poll-seconds=0.3"], capsys)
  assert code == k8s.STILL_RUNNING and "--timeout=1" in err


def _index_pod(name, index, created, phase="Running", job_index=None, exit_code=None):
  labels = {"batch.kubernetes.io/job-completion-index": str(index)}
  if job_index is not None:
    labels["jobset.sigs.k8s.io/job-index"] = str(job_index)
  pod = {"metadata": {"name": name, "labels": labels, "creationTimestamp": created},
         "status": {"phase": phase}}
  if exit_code is not None:
    pod["status"]["containerStatuses"] = [
        {"name": "trainer", "state": {"terminated": {"exitCode": exit_code}}}]
  return pod


def _pods(fake_kubectl, *pods):
  (fake_kubectl / "pods.json").write_text(json.dumps({"items": list(pods)}))


def test_logs_interleave_pods_in_time_order(fake_kubectl, capsys):
  _pods(fake_kubectl, _index_pod("gpu-demo-0-a", 0, "2026-01-01T00:00:00Z"),
        _index_pod("gpu-demo-1-b", 1, "2026-01-01T00:00:00Z"))
  (fake_kubectl / "logs-gpu-demo-0-a.txt").write_text(
      "2026-01-01T00:00:01.5Z step 0 loss 2.3\n2026-01-01T00:00:03Z step 10\n"
      "a line without timestamp\n")
  (fake_kubectl / "logs-gpu-demo-1-b.txt").write_text(
      "2026-01-01T00:00:01.25Z process 1 joined\n2026-01-01T00:00:02Z [x] y: z\n")
  code, out, err = launch(INVOCATIONS["logs-gpu"], capsys)
  assert code == 0, err
  assert out.splitlines() == ["[pod 1] process 1 joined", "[pod 0] step 0 loss 2.3",
                              "[pod 1] [x] y: z", "[pod 0] step 10",
                              "[pod 0] a line without timestamp"]
  assert _calls(fake_kubectl)[0] == [
      "get", "pods", "-n", "jaxjob", "-l", "batch.kubernetes.io/job-name=gpu-demo", "-o", "json"]
  assert sorted(_calls(fake_kubectl)[1:]) == [
      ["logs", "-n", "jaxjob", pod, "-c", "trainer", "--tail=-1", "--timestamps"]
      for pod in ("gpu-demo-0-a", "gpu-demo-1-b")]


def test_logs_show_only_the_newest_attempt_of_each_index(fake_kubectl, capsys):
  # Index 1 failed (exit 137) and was recreated: its old pod stays, and kubectl's selector would
  # have merged both attempts into one [pod 1] stream.
  _pods(fake_kubectl, _index_pod("d-1-old", 1, "2026-01-01T00:00:00Z", "Failed", exit_code=137),
        _index_pod("d-0-a", 0, "2026-01-01T00:00:00Z"),
        _index_pod("d-1-new", 1, "2026-01-01T00:05:00Z"))
  (fake_kubectl / "logs-d-1-old.txt").write_text("2026-01-01T00:00:01Z attempt one\n")
  (fake_kubectl / "logs-d-1-new.txt").write_text("2026-01-01T00:05:01Z attempt two\n")
  (fake_kubectl / "logs-d-0-a.txt").write_text("2026-01-01T00:00:01Z zero\n")
  code, out, err = launch(["logs", "--name=d"], capsys)
  assert code == 0, err
  assert out.splitlines() == ["[pod 0] zero", "[pod 1] attempt two"]
  assert "1 earlier attempt(s) left out" in err
  assert not [c for c in _calls(fake_kubectl) if "d-1-old" in c]


def test_logs_of_many_pods_and_slices_are_one_stream_each(fake_kubectl, capsys):
  # kubectl logs -l follows at most 5 pods by default (--max-log-requests); one kubectl per pod
  # has no such limit.
  pods = [_index_pod(f"t-{s}-{i}", i, "2026-01-01T00:00:00Z", job_index=s)
          for s in range(2) for i in range(4)]
  _pods(fake_kubectl, *pods)
  for pod in pods:
    name = pod["metadata"]["name"]
    (fake_kubectl / f"logs-{name}.txt").write_text(f"2026-01-01T00:00:01Z {name}\n")
  code, out, _ = launch(["logs", "--jobset", "--name=t", "--nodes=8", "--follow"], capsys)
  assert code == 0
  assert sorted(out.splitlines()) == sorted(
      [f"[pod {i}] t-0-{i}" for i in range(4)] + [f"[slice 1 pod {i}] t-1-{i}" for i in range(4)])
  assert len([c for c in _calls(fake_kubectl) if c[0] == "logs"]) == 8


def test_logs_follow_and_a_failing_pod(fake_kubectl, capsys):
  _pods(fake_kubectl, _index_pod("g-0", 0, "2026-01-01T00:00:00Z"),
        _index_pod("g-1", 1, "2026-01-01T00:00:00Z", phase="Pending"))
  (fake_kubectl / "logs-g-0.txt").write_text("2026-01-01T00:00:01Z hello\n")
  code, out, err = launch(["logs", "--name=g", "--nodes=3", "--follow"], capsys)
  assert code == 1  # pod 1 has no log yet: its kubectl failed; index 2 has no pod at all
  assert "[pod 0] hello" in out.splitlines()
  assert "[pod 1] error: container trainer in pod g-1 is waiting to start" in out.splitlines()
  assert "1 of 3 pods not created yet" in err
  assert all(c[-1] == "--follow" for c in _calls(fake_kubectl) if c[0] == "logs")


def test_apply_wait_logs_delete_returns_the_outcome(fake_kubectl, capsys):
  states = [_job(None, active=2), _job(None, active=2),
            _job("Failed", "Container trainer for pod jaxjob/x failed with exit code 2")]
  (fake_kubectl / "job.json").write_text(json.dumps(states))
  _pods(fake_kubectl, _index_pod("gpu-demo-workers-0-0-a", 0, "2026-01-01T00:00:00Z"),
        _index_pod("gpu-demo-workers-0-1-b", 1, "2026-01-01T00:00:00Z"))
  (fake_kubectl / "logs-gpu-demo-workers-0-0-a.txt").write_text("2026-01-01T00:00:01Z bad flag\n")
  (fake_kubectl / "logs-gpu-demo-workers-0-1-b.txt").write_text("2026-01-01T00:00:01Z one\n")
  argv = INVOCATIONS["apply-gpu-wait"]
  split = argv.index("--")
  code, out, _ = launch(argv[:split] + ["--poll-seconds=0.1"] + argv[split:], capsys)
  assert code == 2  # the trainer's exit code is the command's
  assert "[pod 0] bad flag" in out.splitlines() and "[pod 1] one" in out.splitlines()
  calls = _calls(fake_kubectl)
  assert calls[0] == ["apply", "-f", "-"]
  assert calls[-1] == ["delete", "jobset", "gpu-demo", "-n", "jaxjob", "--ignore-not-found",
                       "--cascade=foreground"]
  assert [c for c in calls if c[0] == "logs"] and "gpu-demo: failed with exit code 2" in out


def test_apply_without_wait_refuses_logs_and_delete(capsys):
  code, out, err = launch(["apply", "--logs", *_GPU], capsys)
  assert (code, out) == (2, "") and "--logs and --delete go with --wait" in err


@pytest.mark.parametrize("kind, flags, expected", [
    ("job", [], "job"), ("none", [], "jobset"), ("none", ["--indexed-job"], "job"),
    ("job", ["--jobset"], "jobset")])
def test_verbs_find_the_kind_of_the_job(kind, flags, expected, fake_kubectl, capsys):
  (fake_kubectl / "kind").write_text(kind)
  code, _, _ = launch(["delete", *flags, "--name=gpu-demo"], capsys)
  assert code == 0
  calls = _calls(fake_kubectl, with_kind_check=True)
  asked = [c for c in calls if c[:2] == ["get", "job"]]
  assert asked == ([] if flags else [["get", "job", "gpu-demo", "-n", "jaxjob",
                                      "--ignore-not-found", "-o", "name"]])
  assert [c[1] for c in calls if c[0] == "delete"] == (
      ["job", "service"] if expected == "job" else ["jobset"])


@pytest.mark.parametrize("flags, kind", [
    (["--nodes=1"], "Job"), (["--nodes=2"], "JobSet"), (["--nodes=2", "--indexed-job"], "Job"),
    (["--nodes=1", "--jobset"], "JobSet")])
def test_several_nodes_are_a_jobset_by_default(flags, kind, capsys):
  code, out, _ = launch(["render", "--name=demo", f"--image={REGISTRY}:v1",
                         f"--workdir={BUCKET}/demo", *flags], capsys)
  assert code == 0
  assert [d["kind"] for d in yaml.safe_load_all(out)][-1] == kind


def test_delete_removes_job_and_service(fake_kubectl, capsys):
  code, _, _ = launch(INVOCATIONS["delete-gpu"], capsys)
  assert code == 0
  assert _calls(fake_kubectl) == [
      ["delete", "job", "gpu-demo", "-n", "jaxjob", "--ignore-not-found", "--cascade=foreground"],
      ["delete", "service", "gpu-demo", "-n", "jaxjob", "--ignore-not-found"]]


# ---------------------------------------------------------------------------------------------
# Manifest rehearsal: the rendered Job's command and env as 2 local processes.


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.timeout(180)
def test_rendered_job_trains_as_local_processes(capsys, tmp_path):
  argv = ["render", "--name=rehearsal", "--nodes=2", f"--image={REGISTRY}:cpu",
          f"--workdir={BUCKET}/rehearsal", "--", CONFIG, "--config.train.steps=60"]
  code, out, err = launch(argv, capsys)
  assert code == 0, err
  docs = list(yaml.safe_load_all(out))
  spec, _, container = job_parts(docs)
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  workdir = tmp_path / "run"
  command = [sys.executable if a == "python" else a for a in container["command"]]
  args = [f"--workdir={workdir}" if a.startswith("--workdir=") else a for a in container["args"]]
  # The session's compilation cache stands in for the image's (tests/conftest.py).
  base_env = {k: v for k, v in os.environ.items()
              if not k.startswith(("JAX_", "XLA_FLAGS", "JAXJOB_"))
              or k == "JAXJOB_COMPILATION_CACHE_DIR"}
  procs = []
  for index in range(spec["completions"]):
    env = dict(base_env, JAXJOB_DEVICES_PER_PROCESS="2", JAX_PLATFORMS="cpu")
    for entry in container["env"]:
      if "value" in entry:
        env[entry["name"]] = entry["value"]
      else:  # The downward API: the completion-index annotation.
        assert entry["valueFrom"]["fieldRef"]["fieldPath"].endswith(f"['{k8s_render.INDEX_KEY}']")
        env[entry["name"]] = str(index)
    host = env["JAX_COORDINATOR_ADDRESS"].rsplit(":", 1)[0]
    # The default for 2 nodes is a JobSet; its headless Service resolves this name in-cluster.
    assert host == "rehearsal-workers-0-0.rehearsal"
    env["JAX_COORDINATOR_ADDRESS"] = f"127.0.0.1:{port}"
    procs.append(subprocess.Popen(command + args, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True))
  outputs = [proc.communicate(timeout=170)[0] for proc in procs]
  assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outputs)
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["num_processes"] == 2
