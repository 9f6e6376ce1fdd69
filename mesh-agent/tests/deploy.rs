//! The deployment files in deploy/, checked with the tools of the platforms
//! they are for:
//!
//! - every Kubernetes manifest, file by file and as `kubectl kustomize`
//!   renders each kustomization (with the generated ConfigMap and Secrets),
//!   against the Kubernetes API's schemas of the pinned versions
//!   (kubernetes-validate --strict: unknown fields are errors), and the
//!   ServiceMonitor against the Prometheus Operator's types; then the
//!   references between the resources (names, labels, ports, volumes), which
//!   no schema checks;
//! - the systemd unit, alone and with its process-binding drop-in, with
//!   `systemd-analyze verify` (any warning fails) and `systemd-analyze
//!   security` (an exposure ceiling), and broken copies of it, which must
//!   fail;
//! - the agent's arguments in the DaemonSet and in the unit, and with the
//!   process-binding and node-mesh flags that mesh-agent.env and the
//!   DaemonSet patches of docs/operations.md add, with
//!   `mesh-agent run --check`, read out of the files (environment and
//!   paths resolved as the kubelet and systemd resolve them) so that they
//!   cannot drift from what the agent accepts;
//! - the capabilities the DaemonSet and the unit grant (the same three):
//!   the real agent, run as root with only those on a veth in namespaces
//!   of its own, starts, enforces and adopts its pins, and without any one
//!   of them cannot start (this test needs root).
//!
//! The tools come from `cargo xtask setup`: systemd-analyze from Debian's
//! systemd, kubectl, kubernetes-validate and the Prometheus Operator's
//! types in a Python environment in target/tools/deploy. A missing tool
//! fails the tests.

use std::{
    collections::BTreeMap,
    fs,
    io::Write as _,
    path::{Component, Path, PathBuf},
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use mesh_agent::identity::{Algorithm, IssuerKey};
use mesh_tests::{BpfFs, ClientServer, METRICS, client_server_policy, http_get, require_root};
use serde_json::Value;

/// The Kubernetes versions whose API schemas the manifests must satisfy:
/// the oldest the docs name and the newest kubernetes-validate knows.
const KUBERNETES_VERSIONS: &[&str] = &["1.30.0", "1.37.0"];

/// The most `systemd-analyze security` exposure the unit may have, in
/// tenths (25 is 2.5 of 10; the unit scores 2.3 with systemd 252).
const SYSTEMD_EXPOSURE_MAX: u32 = 25;

/// An address for `$(POD_IP)`: `run --check` binds nothing.
const POD_IP: &str = "192.0.2.10";

/// A name for `spec.nodeName`.
const NODE_NAME: &str = "node-a";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn deploy() -> PathBuf {
    root().join("deploy")
}

/// A tool of the deployment tests' Python environment.
fn tool(name: &str) -> PathBuf {
    let path = root().join("target/tools/deploy/bin").join(name);
    assert!(
        path.is_file(),
        "{} missing: run `cargo xtask setup`",
        path.display()
    );
    path
}

fn systemd_analyze() -> Command {
    let found = ["/usr/bin/systemd-analyze", "/bin/systemd-analyze"]
        .into_iter()
        .find(|path| Path::new(path).is_file())
        .expect("systemd-analyze missing: run `cargo xtask setup` (Debian's systemd)");
    Command::new(found)
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Runs `command` with `input` on stdin.
fn run(command: &mut Command, input: &str) -> Output {
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|err| panic!("cannot run {command:?}: {err}"));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn succeed(command: &mut Command, input: &str) -> String {
    let output = run(command, input);
    assert!(
        output.status.success(),
        "{command:?} failed ({}):\n{}{}",
        output.status,
        text(&output.stdout),
        text(&output.stderr)
    );
    text(&output.stdout)
}

/// The documents of a YAML stream, as JSON values.
fn yaml_documents(yaml: &str) -> Vec<Value> {
    let json = succeed(
        Command::new(tool("python")).args([
            "-c",
            "import json, sys, yaml\n\
             json.dump([d for d in yaml.safe_load_all(sys.stdin) if d], sys.stdout)",
        ]),
        yaml,
    );
    serde_json::from_str(&json).unwrap()
}

fn kustomize(dir: &Path) -> Vec<Value> {
    yaml_documents(&succeed(
        Command::new(tool("kubectl")).arg("kustomize").arg(dir),
        "",
    ))
}

fn kind(doc: &Value) -> &str {
    doc["kind"].as_str().unwrap_or_default()
}

fn name(doc: &Value) -> &str {
    doc["metadata"]["name"].as_str().unwrap_or_default()
}

fn shown(doc: &Value) -> String {
    format!("{}/{}", kind(doc), name(doc))
}

/// Checks every document against the schemas: built-in kinds with
/// kubernetes-validate, which must report each one as passed (it only warns
/// about a kind it has no schema for, which fails here), and the
/// ServiceMonitor with the Prometheus Operator's types.
fn validate(docs: &[Value], what: &str) {
    assert!(!docs.is_empty(), "{what}: no resources");
    let (monitors, builtin): (Vec<&Value>, Vec<&Value>) = docs
        .iter()
        .partition(|doc| doc["apiVersion"] == "monitoring.coreos.com/v1");
    for monitor in monitors {
        validate_servicemonitor(monitor, what);
    }
    if builtin.is_empty() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("resources.yaml");
    let stream: Vec<String> = builtin.iter().map(|doc| doc.to_string()).collect();
    fs::write(&file, stream.join("\n---\n")).unwrap();
    for version in KUBERNETES_VERSIONS {
        let output = run(
            Command::new(tool("kubernetes-validate"))
                .args(["--strict", "--kubernetes-version", version])
                .arg(&file),
            "",
        );
        let report = text(&output.stdout) + &text(&output.stderr);
        let problems: Vec<&str> = report
            .lines()
            .filter(|line| !line.starts_with("INFO "))
            .collect();
        assert!(
            output.status.success() && problems.is_empty(),
            "{what} is not valid Kubernetes {version}:\n{report}"
        );
        for doc in &builtin {
            let passed = format!(
                "passed for resource {}/{} against version",
                kind(doc).to_lowercase(),
                name(doc)
            );
            assert!(
                report.contains(&passed),
                "{what}: {} was not validated against Kubernetes {version}:\n{report}",
                shown(doc)
            );
        }
    }
}

/// The ServiceMonitor against the Prometheus Operator's types. The types
/// ignore fields they do not know, so the check also reads the resource
/// back from them: a field that went missing is an unknown one.
fn validate_servicemonitor(doc: &Value, what: &str) {
    const CHECK: &str = r#"
import json, sys
from cloudcoil.models.prometheus_operator.v1 import ServiceMonitor
doc = json.load(sys.stdin)
back = ServiceMonitor.model_validate(doc).model_dump(
    mode="json", by_alias=True, exclude_unset=True)

def diff(given, read, path):
    if isinstance(given, dict) and isinstance(read, dict):
        for key in sorted(given.keys() | read.keys()):
            if key not in read:
                yield f"{path}.{key}: not a field of a ServiceMonitor"
            elif key not in given:
                yield f"{path}.{key}: added"
            else:
                yield from diff(given[key], read[key], f"{path}.{key}")
    elif isinstance(given, list) and isinstance(read, list) and len(given) == len(read):
        for index, (a, b) in enumerate(zip(given, read)):
            yield from diff(a, b, f"{path}[{index}]")
    elif given != read:
        yield f"{path}: {given!r} reads as {read!r}"

problems = list(diff(doc, back, ""))
print("\n".join(problems))
sys.exit(1 if problems else 0)
"#;
    let output = run(
        Command::new(tool("python")).args(["-c", CHECK]),
        &doc.to_string(),
    );
    assert!(
        output.status.success(),
        "{what}: {} is not a valid ServiceMonitor:\n{}{}",
        shown(doc),
        text(&output.stdout),
        text(&output.stderr)
    );
}

/// The manifests under `dir`, kustomization files aside.
fn manifest_files(dir: &Path, found: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            manifest_files(&path, found);
        } else if path
            .extension()
            .is_some_and(|ext| ext == "yaml" || ext == "yml")
            && path.file_name().unwrap() != "kustomization.yaml"
        {
            found.push(path);
        }
    }
}

#[test]
fn every_manifest_file_is_valid() {
    let mut files = Vec::new();
    manifest_files(&deploy(), &mut files);
    let names: Vec<String> = files
        .iter()
        .map(|path| path.strip_prefix(deploy()).unwrap().display().to_string())
        .collect();
    for expected in [
        "kubernetes/daemonset.yaml",
        "kubernetes/namespace.yaml",
        "kubernetes/service.yaml",
        "kubernetes/serviceaccount.yaml",
        "kubernetes/servicemonitor/servicemonitor.yaml",
    ] {
        assert!(
            names.iter().any(|name| name == expected),
            "{expected} not found among {names:?}"
        );
    }
    for (file, name) in files.iter().zip(&names) {
        let docs = yaml_documents(&fs::read_to_string(file).unwrap());
        validate(&docs, name);
    }
}

/// Finds the one resource of `kind` named `name`.
fn find<'a>(docs: &'a [Value], kind_: &str, name_: &str) -> &'a Value {
    let found: Vec<&Value> = docs
        .iter()
        .filter(|doc| kind(doc) == kind_ && name(doc) == name_)
        .collect();
    assert_eq!(found.len(), 1, "expected one {kind_}/{name_}");
    found[0]
}

fn daemonset(docs: &[Value]) -> &Value {
    find(docs, "DaemonSet", "mesh-agent")
}

fn container(docs: &[Value]) -> &Value {
    let containers = daemonset(docs)["spec"]["template"]["spec"]["containers"]
        .as_array()
        .unwrap();
    assert_eq!(containers.len(), 1, "the agent's pod has one container");
    &containers[0]
}

fn list(value: &Value) -> &[Value] {
    value.as_array().map(Vec::as_slice).unwrap_or_default()
}

/// `labels` holds every label of `selector`.
fn selects(selector: &Value, labels: &Value) -> bool {
    let selector = selector.as_object().unwrap();
    !selector.is_empty() && selector.iter().all(|(key, value)| &labels[key] == value)
}

/// What no schema checks: that the resources refer to each other rightly.
fn check_references(docs: &[Value], what: &str) {
    let namespace = find(docs, "Namespace", "mesh-system");
    assert_eq!(
        namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"], "privileged",
        "{what}: the agents' pods need the privileged Pod Security level"
    );
    for doc in docs.iter().filter(|doc| kind(doc) != "Namespace") {
        assert_eq!(
            doc["metadata"]["namespace"],
            "mesh-system",
            "{what}: {}",
            shown(doc)
        );
    }
    let daemonset = daemonset(docs);
    let pod = &daemonset["spec"]["template"];
    let pod_labels = &pod["metadata"]["labels"];
    assert!(selects(
        &daemonset["spec"]["selector"]["matchLabels"],
        pod_labels
    ));
    let spec = &pod["spec"];
    find(
        docs,
        "ServiceAccount",
        spec["serviceAccountName"].as_str().unwrap(),
    );
    assert_eq!(spec["hostNetwork"], true, "{what}: the node's interfaces");

    // Volumes: every mount names a volume; ConfigMaps exist; Secrets exist
    // where they are not optional, and where the resources hold any Secret.
    let volumes = list(&spec["volumes"]);
    let container = container(docs);
    for mount in list(&container["volumeMounts"]) {
        assert!(
            volumes.iter().any(|volume| volume["name"] == mount["name"]),
            "{what}: the mount {} names no volume",
            mount["name"]
        );
    }
    let has_secrets = docs.iter().any(|doc| kind(doc) == "Secret");
    for volume in volumes {
        if let Some(config_map) = volume["configMap"]["name"].as_str() {
            find(docs, "ConfigMap", config_map);
        }
        if let Some(secret) = volume["secret"]["secretName"].as_str()
            && (has_secrets || volume["secret"]["optional"] != true)
        {
            find(docs, "Secret", secret);
        }
    }

    // Ports: the probes, the Service and the ServiceMonitor use the
    // container's port by name.
    let ports: Vec<&Value> = list(&container["ports"])
        .iter()
        .map(|port| &port["name"])
        .collect();
    for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
        let get = &container[probe]["httpGet"];
        assert!(
            ports.contains(&&get["port"]),
            "{what}: {probe} uses no port of the container"
        );
        let path = get["path"].as_str().unwrap();
        assert!(
            ["/healthz", "/readyz"].contains(&path),
            "{what}: {probe} asks {path}, which the agent does not serve"
        );
    }
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
    for doc in docs.iter().filter(|doc| kind(doc) == "Service") {
        assert!(selects(&doc["spec"]["selector"], pod_labels), "{what}");
        for port in list(&doc["spec"]["ports"]) {
            assert!(ports.contains(&&port["targetPort"]), "{what}: {port}");
        }
    }
    for monitor in docs.iter().filter(|doc| kind(doc) == "ServiceMonitor") {
        let services: Vec<&Value> = docs
            .iter()
            .filter(|doc| kind(doc) == "Service")
            .filter(|doc| {
                selects(
                    &monitor["spec"]["selector"]["matchLabels"],
                    &doc["metadata"]["labels"],
                )
            })
            .collect();
        assert_eq!(services.len(), 1, "{what}: the ServiceMonitor's Service");
        let service_ports: Vec<&Value> = list(&services[0]["spec"]["ports"])
            .iter()
            .map(|port| &port["name"])
            .collect();
        for endpoint in list(&monitor["spec"]["endpoints"]) {
            assert!(service_ports.contains(&&endpoint["port"]), "{what}");
        }
        assert!(
            list(&monitor["spec"]["namespaceSelector"]["matchNames"])
                .contains(&services[0]["metadata"]["namespace"])
        );
    }

    // Rolling updates: one node at a time, the old agent gone first.
    let update = &daemonset["spec"]["updateStrategy"];
    assert_eq!(update["type"], "RollingUpdate", "{what}");
    assert_eq!(update["rollingUpdate"]["maxUnavailable"], 1, "{what}");
    assert_eq!(update["rollingUpdate"]["maxSurge"], 0, "{what}");
    let security = &container["securityContext"];
    assert_eq!(security["privileged"], false, "{what}");
    assert_eq!(
        security["capabilities"]["add"],
        serde_json::json!(["BPF", "NET_ADMIN", "PERFMON"]),
        "{what}"
    );
    for resources in ["requests", "limits"] {
        for of in ["cpu", "memory"] {
            assert!(
                container["resources"][resources][of].is_string(),
                "{what}: no {resources}.{of}"
            );
        }
    }
}

/// The path from `from` to `to`, both absolute (kustomize takes only
/// relative paths).
fn relative(from: &Path, to: &Path) -> PathBuf {
    let (from, to) = (from.canonicalize().unwrap(), to.canonicalize().unwrap());
    let from: Vec<Component> = from.components().collect();
    let to: Vec<Component> = to.components().collect();
    let common = from.iter().zip(&to).take_while(|(a, b)| a == b).count();
    let mut path = PathBuf::new();
    for _ in common..from.len() {
        path.push("..");
    }
    for part in &to[common..] {
        path.push(part);
    }
    path
}

#[test]
fn the_base_renders_to_valid_resources() {
    let docs = kustomize(&deploy().join("kubernetes"));
    let mut kinds: Vec<String> = docs.iter().map(shown).collect();
    kinds.sort();
    assert_eq!(
        kinds,
        [
            "ConfigMap/mesh-agent-pools",
            "ConfigMap/mesh-policy",
            "DaemonSet/mesh-agent",
            "Namespace/mesh-system",
            "Service/mesh-agent-metrics",
            "ServiceAccount/mesh-agent",
        ]
    );
    validate(&docs, "deploy/kubernetes");
    check_references(&docs, "deploy/kubernetes");
    // The ConfigMap keeps its name, so that a policy change reaches the
    // running agents instead of rolling them; and it is policy.toml.
    let policy = find(&docs, "ConfigMap", "mesh-policy");
    assert_eq!(
        policy["data"]["policy.toml"].as_str().unwrap(),
        fs::read_to_string(deploy().join("kubernetes/policy.toml")).unwrap()
    );
}

#[test]
fn the_example_overlay_renders_to_valid_resources() {
    let docs = kustomize(&deploy().join("examples/kubernetes"));
    validate(&docs, "deploy/examples/kubernetes");
    check_references(&docs, "deploy/examples/kubernetes");
    find(&docs, "ServiceMonitor", "mesh-agent");
    assert_eq!(
        container(&docs)["image"],
        "registry.example.com/mesh/mesh-agent:0.1.0"
    );
    let policy = find(&docs, "ConfigMap", "mesh-policy");
    assert_eq!(
        policy["data"]["policy.toml"].as_str().unwrap(),
        fs::read_to_string(deploy().join("examples/kubernetes/policy.toml")).unwrap()
    );
}

/// The base with the ServiceMonitor and the Secrets generated as
/// docs/operations.md describes: the Secrets' names are the DaemonSet's.
#[test]
fn secrets_and_the_servicemonitor_fit_the_base() {
    let dir = tempfile::tempdir().unwrap();
    let base = relative(dir.path(), &deploy().join("kubernetes"));
    fs::write(dir.path().join("node-a.jwt"), "join token of node-a\n").unwrap();
    fs::write(dir.path().join("bundle.json"), "{\"keys\": []}\n").unwrap();
    fs::write(
        dir.path().join("kustomization.yaml"),
        format!(
            "apiVersion: kustomize.config.k8s.io/v1beta1\n\
             kind: Kustomization\n\
             resources:\n  - {base}\n\
             components:\n  - {base}/servicemonitor\n\
             secretGenerator:\n\
             \x20 - name: mesh-join-tokens\n\
             \x20   namespace: mesh-system\n\
             \x20   files:\n\
             \x20     - node-a=node-a.jwt\n\
             \x20 - name: mesh-trust-bundles\n\
             \x20   namespace: mesh-system\n\
             \x20   files:\n\
             \x20     - identity-bundle.json=bundle.json\n",
            base = base.display()
        ),
    )
    .unwrap();
    let docs = kustomize(dir.path());
    validate(&docs, "base + servicemonitor + secrets");
    check_references(&docs, "base + servicemonitor + secrets");
    find(&docs, "ServiceMonitor", "mesh-agent");
    let secrets = docs.iter().filter(|doc| kind(doc) == "Secret").count();
    assert_eq!(secrets, 2);
    // Both Secrets are mounted (kustomize renamed the references to the
    // generated names only because the names matched).
    let mounted: Vec<&str> = list(&daemonset(&docs)["spec"]["template"]["spec"]["volumes"])
        .iter()
        .filter_map(|volume| volume["secret"]["secretName"].as_str())
        .collect();
    assert_eq!(mounted.len(), 2);
    for secret in mounted {
        assert!(
            secret.starts_with("mesh-join-tokens-") || secret.starts_with("mesh-trust-bundles-")
        );
    }
}

/// The value of `--flag=VALUE` (or `--flag VALUE`) in `args`.
fn flag<'a>(args: &'a [String], flag: &str) -> &'a str {
    let with_value = format!("{flag}=");
    let found: Vec<&str> = args
        .iter()
        .enumerate()
        .filter_map(|(index, arg)| {
            if let Some(value) = arg.strip_prefix(&with_value) {
                Some(value)
            } else if arg == flag {
                args.get(index + 1).map(String::as_str)
            } else {
                None
            }
        })
        .collect();
    assert_eq!(found.len(), 1, "one {flag} in {args:?}");
    found[0]
}

/// Replaces the value of `flag` in `args`.
fn replace_flag(args: &mut [String], flag: &str, value: &str) {
    let with_value = format!("{flag}=");
    for index in 0..args.len() {
        if args[index].starts_with(&with_value) {
            args[index] = format!("{flag}={value}");
        } else if args[index] == flag {
            args[index + 1] = value.to_owned();
        }
    }
}

/// Runs the agent's `run --check` with `args` (starting with `run`).
fn run_check(args: &[String]) -> Output {
    assert_eq!(args.first().map(String::as_str), Some("run"), "{args:?}");
    Command::new(env!("CARGO_BIN_EXE_mesh-agent"))
        .args(args)
        .arg("--check")
        .env_remove("RUST_LOG")
        .output()
        .unwrap()
}

fn assert_checked(args: &[String], what: &str) {
    let output = run_check(args);
    let stdout = text(&output.stdout);
    assert!(
        output.status.success(),
        "{what}: `mesh-agent {}` --check failed:\n{stdout}{}",
        args.join(" "),
        text(&output.stderr)
    );
    let policy = flag(args, "--policy");
    assert!(
        stdout.contains(&format!("policy {policy}: valid")),
        "{what}:\n{stdout}"
    );
    assert!(stdout.contains("checked only"), "{what}:\n{stdout}");
}

/// Kubernetes' expansion of `$(NAME)` in a container's arguments, from the
/// container's environment; `$$` escapes, and an unknown name stays.
fn expand_kubernetes(arg: &str, env: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    let mut rest = arg;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        rest = &rest[at..];
        if let Some(after) = rest.strip_prefix("$$") {
            out.push('$');
            rest = after;
        } else if let Some((name, after)) = rest
            .strip_prefix("$(")
            .and_then(|inner| inner.split_once(')'))
            && let Some(value) = env.get(name)
        {
            out.push_str(value);
            rest = after;
        } else {
            out.push('$');
            rest = &rest[1..];
        }
    }
    out + rest
}

/// The agent's command line in a rendered DaemonSet, as the kubelet would
/// start it, with the policy file taken from the ConfigMap it is mounted
/// from and written to `scratch`.
fn daemonset_command_line(docs: &[Value], scratch: &Path) -> Vec<String> {
    let container = container(docs);
    assert_eq!(
        container["command"],
        serde_json::json!(["/usr/local/bin/mesh-agent"])
    );
    let mut env = BTreeMap::new();
    for var in list(&container["env"]) {
        let name = var["name"].as_str().unwrap().to_owned();
        let value = if let Some(value) = var["value"].as_str() {
            value.to_owned()
        } else if var["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP" {
            POD_IP.to_owned()
        } else if var["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName" {
            NODE_NAME.to_owned()
        } else {
            panic!("no value for {name} in the test");
        };
        env.insert(name, value);
    }
    let mut args: Vec<String> = list(&container["args"])
        .iter()
        .map(|arg| expand_kubernetes(arg.as_str().unwrap(), &env))
        .collect();

    let spec = &daemonset(docs)["spec"]["template"]["spec"];
    let volume = |name: &Value| {
        list(&spec["volumes"])
            .iter()
            .find(|volume| &volume["name"] == name)
            .unwrap()
    };
    // The mount holding `path`, and the volume it mounts.
    let mount_of = |path: &str| {
        list(&container["volumeMounts"])
            .iter()
            .find(|mount| Path::new(path).starts_with(mount["mountPath"].as_str().unwrap()))
            .map(|mount| (mount, volume(&mount["name"])))
            .unwrap_or_else(|| panic!("{path} is on no volume of the pod"))
    };

    let policy = flag(&args, "--policy").to_owned();
    let (mount, from) = mount_of(&policy);
    let config_map = find(
        docs,
        "ConfigMap",
        from["configMap"]["name"].as_str().unwrap(),
    );
    let key = Path::new(&policy)
        .strip_prefix(mount["mountPath"].as_str().unwrap())
        .unwrap();
    let contents = config_map["data"][key.to_str().unwrap()]
        .as_str()
        .unwrap_or_else(|| panic!("the ConfigMap has no {}", key.display()));
    let local = scratch.join(key);
    fs::write(&local, contents).unwrap();
    replace_flag(&mut args, "--policy", local.to_str().unwrap());

    // The pins and the state are the node's, so that they outlive the pod.
    let bpffs = flag(&args, "--bpffs").to_owned();
    let (_, from) = mount_of(&bpffs);
    assert_eq!(from["hostPath"]["path"], "/sys/fs/bpf", "--bpffs {bpffs}");
    let state = flag(&args, "--state-dir").to_owned();
    let (_, from) = mount_of(&state);
    assert!(from["hostPath"]["path"].is_string(), "--state-dir {state}");
    args
}

#[test]
fn the_daemonsets_arguments_pass_run_check() {
    for (dir, what) in [
        (deploy().join("kubernetes"), "deploy/kubernetes"),
        (
            deploy().join("examples/kubernetes"),
            "deploy/examples/kubernetes",
        ),
    ] {
        let docs = kustomize(&dir);
        let scratch = tempfile::tempdir().unwrap();
        let args = daemonset_command_line(&docs, scratch.path());
        assert!(
            args.contains(&format!("--metrics-listen={POD_IP}:9464")),
            "{what}: {args:?}"
        );
        assert_checked(&args, what);

        // The check fails where the agent would: a flag it does not know,
        // an interface name the kernel refuses, a policy with an error.
        let mut wrong = args.clone();
        wrong.push("--no-such-flag".to_owned());
        assert!(!run_check(&wrong).status.success(), "{what}: unknown flag");
        let mut wrong = args.clone();
        replace_flag(&mut wrong, "--interface", "no/such");
        assert!(!run_check(&wrong).status.success(), "{what}: bad interface");
        let policy = flag(&args, "--policy").to_owned();
        fs::write(&policy, "version = 1\ntrust_domain = \"a\"\n[[grant]]\n").unwrap();
        assert!(!run_check(&args).status.success(), "{what}: bad policy");
    }
}

/// The kustomize patches of docs/operations.md: its YAML blocks that start
/// with `- target:`, without the indentation of a list item's block.
fn documented_patches() -> Vec<String> {
    let docs = fs::read_to_string(root().join("docs/operations.md")).unwrap();
    docs.split("```yaml\n")
        .skip(1)
        .filter_map(|block| block.split_once("```").map(|(yaml, _)| yaml))
        .filter_map(|yaml| {
            let indent = yaml.len() - yaml.trim_start_matches(' ').len();
            yaml[indent..].starts_with("- target:").then(|| {
                yaml.lines()
                    .map(|line| format!("{}\n", line.get(indent..).unwrap_or_default()))
                    .collect()
            })
        })
        .collect()
}

/// Runs the agent with `args` and returns its stdout.
fn agent(args: &[&str]) -> String {
    succeed(
        Command::new(env!("CARGO_BIN_EXE_mesh-agent"))
            .args(args)
            .env_remove("RUST_LOG"),
        "",
    )
}

/// What a node of the mesh reads, made as docs/operations.md makes it, in
/// `dir`: the admin's bundle, a join token for [`NODE_NAME`] in
/// 198.18.1.0/24 bound to the node's key, and the state folder holding that
/// key.
struct JoinFiles {
    bundle: PathBuf,
    token: PathBuf,
    state: PathBuf,
}

impl JoinFiles {
    fn make(dir: &Path) -> Self {
        let admin = dir.join("admin");
        let state = dir.join("state");
        agent(&["token", "keygen", "--out", admin.to_str().unwrap()]);
        let node_key = agent(&["node", "key", "--state-dir", state.to_str().unwrap()]);
        let token = agent(&[
            "node",
            "token",
            "issue",
            "--key",
            admin.join("issuer.jwk").to_str().unwrap(),
            "--node",
            NODE_NAME,
            "--prefix",
            "198.18.1.0/24",
            "--node-key",
            node_key.trim(),
            "--ttl",
            "1d",
        ]);
        let join_token = dir.join("join-token");
        fs::write(&join_token, token).unwrap();
        Self {
            bundle: admin.join("bundle.json"),
            token: join_token,
            state,
        }
    }
}

/// The patches that docs/operations.md gives for the DaemonSet (a second
/// interface, process binding, the node mesh) render to valid resources
/// with the base, and the agent's command line they make passes
/// `run --check`, with the files they name from the mounted Secrets made as
/// the docs make them (a trust bundle, a join token bound to the node's key).
#[test]
fn the_documented_patches_pass_run_check() {
    let patches = documented_patches();
    assert!(patches.len() >= 3, "{patches:?}");
    let keys = tempfile::tempdir().unwrap();
    let JoinFiles {
        bundle,
        token: join_token,
        state,
    } = JoinFiles::make(keys.path());

    for patch in patches {
        let dir = tempfile::tempdir().unwrap();
        let base = relative(dir.path(), &deploy().join("kubernetes"));
        let indented: String = patch.lines().map(|line| format!("  {line}\n")).collect();
        fs::write(
            dir.path().join("kustomization.yaml"),
            format!(
                "apiVersion: kustomize.config.k8s.io/v1beta1\n\
                 kind: Kustomization\n\
                 resources:\n  - {}\n\
                 patches:\n{indented}",
                base.display()
            ),
        )
        .unwrap();
        let docs = kustomize(dir.path());
        let what = format!("the base with the patch\n{patch}");
        validate(&docs, &what);
        check_references(&docs, &what);
        let scratch = tempfile::tempdir().unwrap();
        let mut args = daemonset_command_line(&docs, scratch.path());
        let pod = &daemonset(&docs)["spec"]["template"]["spec"];
        if args.iter().any(|arg| arg.starts_with("--agent-pool")) {
            // The agent must see the pid of `exec` on the node.
            assert_eq!(pod["hostPID"], true, "{what}");
        }
        // The volume that holds the file `path` that flag `name` names.
        let volume_of = |name: &str, path: &str| -> &Value {
            let mount = list(&container(&docs)["volumeMounts"])
                .iter()
                .find(|mount| Path::new(path).starts_with(mount["mountPath"].as_str().unwrap()))
                .unwrap_or_else(|| panic!("{what}: {name} {path} is on no volume"));
            list(&pod["volumes"])
                .iter()
                .find(|volume| volume["name"] == mount["name"])
                .unwrap()
        };
        // The files the flags name are in the mounted Secrets.
        for (name, local) in [
            ("--trust-bundle", &bundle),
            ("--mesh-bundle", &bundle),
            ("--join-token", &join_token),
        ] {
            if !args.iter().any(|arg| arg.starts_with(name)) {
                continue;
            }
            let path = flag(&args, name).to_owned();
            assert!(
                volume_of(name, &path)["secret"].is_object(),
                "{what}: {name} {path} is not in a Secret"
            );
            replace_flag(&mut args, name, local.to_str().unwrap());
        }
        // The node's pool is its key in the pools' ConfigMap, which the
        // overlay fills as the docs show.
        let name = "--agent-pool-file";
        if args.iter().any(|arg| arg.starts_with(name)) {
            let path = flag(&args, name).to_owned();
            assert_eq!(
                volume_of(name, &path)["configMap"]["name"],
                "mesh-agent-pools",
                "{what}"
            );
            assert!(path.ends_with(&format!("/{NODE_NAME}")), "{what}: {path}");
            let pools = scratch.path().join("pools");
            fs::write(&pools, "# the node's pool\n100.96.3.0/24\n").unwrap();
            replace_flag(&mut args, name, pools.to_str().unwrap());
            let bad_pools = scratch.path().join("bad-pools");
            fs::write(&bad_pools, "100.96.3.0/33\n").unwrap();
            let mut bad = args.clone();
            replace_flag(&mut bad, name, bad_pools.to_str().unwrap());
            let refused = run_check(&bad);
            assert!(
                !refused.status.success()
                    && text(&refused.stderr)
                        .contains(&format!("{}:1: invalid prefix", bad_pools.display())),
                "{what}: a bad pool file: {refused:?}"
            );
        }
        // The node's key is in its state folder.
        replace_flag(&mut args, "--state-dir", state.to_str().unwrap());
        assert_checked(&args, &what);
        if args.iter().any(|arg| arg.starts_with("--join-token")) {
            let output = text(&run_check(&args).stdout);
            assert!(
                output.contains(&format!("mesh: join as node {NODE_NAME} ")),
                "{what}:\n{output}"
            );
        }
    }
}

/// A unit file's settings: section → key → values in order.
type Unit = BTreeMap<String, BTreeMap<String, Vec<String>>>;

fn parse_unit(source: &str) -> Unit {
    let mut unit = Unit::new();
    let mut section = String::new();
    let mut pending = String::new();
    for line in source.lines() {
        let line = line.trim();
        if pending.is_empty() && (line.is_empty() || line.starts_with(['#', ';'])) {
            continue;
        }
        if let Some(continued) = line.strip_suffix('\\') {
            pending.push_str(continued);
            pending.push(' ');
            continue;
        }
        let line = std::mem::take(&mut pending) + line;
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_owned();
        } else {
            let (key, value) = line.split_once('=').expect("KEY=VALUE");
            unit.entry(section.clone())
                .or_default()
                .entry(key.trim().to_owned())
                .or_default()
                .push(value.trim().to_owned());
        }
    }
    unit
}

fn setting<'a>(unit: &'a Unit, section: &str, key: &str) -> &'a str {
    let values = &unit[section][key];
    assert_eq!(values.len(), 1, "one {key}= in [{section}]");
    &values[0]
}

/// An environment file as systemd reads it: KEY=VALUE lines, comments,
/// values in quotes.
fn parse_env_file(source: &str) -> BTreeMap<String, String> {
    source
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with(['#', ';']))
        .map(|line| {
            let (key, value) = line.split_once('=').expect("KEY=VALUE");
            let value = value.trim();
            let value = ['"', '\'']
                .into_iter()
                .find_map(|quote| value.strip_prefix(quote)?.strip_suffix(quote))
                .unwrap_or(value);
            (key.trim().to_owned(), value.to_owned())
        })
        .collect()
}

/// systemd's expansion of a command line: `$NAME` alone is split at
/// whitespace into words, `${NAME}` is one word's part.
fn expand_systemd(command: &str, env: &BTreeMap<String, String>) -> Vec<String> {
    assert!(
        !command.contains(['"', '\'', '\\']),
        "the test reads no quoting: {command}"
    );
    let mut words = Vec::new();
    for word in command.split_whitespace() {
        if let Some(name) = word.strip_prefix('$')
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            words.extend(env[name].split_whitespace().map(str::to_owned));
            continue;
        }
        let mut out = String::new();
        let mut rest = word;
        while let Some(at) = rest.find("${") {
            out.push_str(&rest[..at]);
            let (name, after) = rest[at + 2..].split_once('}').unwrap();
            out.push_str(
                env.get(name)
                    .unwrap_or_else(|| panic!("${{{name}}} is not set")),
            );
            rest = after;
        }
        words.push(out + rest);
    }
    words
}

/// The `install … SOURCE DESTINATION` lines of the unit's header: where
/// each file of the repository goes.
fn installs(unit_source: &str) -> BTreeMap<String, String> {
    unit_source
        .lines()
        .filter_map(|line| line.strip_prefix('#')?.trim().strip_prefix("install "))
        .map(|line| {
            let words: Vec<&str> = line.split_whitespace().collect();
            let [.., source, destination] = words[..] else {
                panic!("install line {line:?}")
            };
            let destination = if destination.ends_with('/') {
                format!(
                    "{destination}{}",
                    Path::new(source).file_name().unwrap().to_str().unwrap()
                )
            } else {
                destination.to_owned()
            };
            (destination, source.to_owned())
        })
        .collect()
}

/// The flags mesh-agent.env lists, commented out, under the item that
/// starts with `heading`: the `#   --flag …` lines that follow it.
fn commented_flags(env_source: &str, heading: &str) -> Vec<String> {
    let flags: Vec<String> = env_source
        .lines()
        .skip_while(|line| !line.starts_with(&format!("# - {heading}")))
        .skip(1)
        .map_while(|line| line.strip_prefix("#   ").filter(|l| l.starts_with("--")))
        .flat_map(str::split_whitespace)
        .map(str::to_owned)
        .collect();
    assert!(
        !flags.is_empty(),
        "mesh-agent.env lists no flags for {heading}"
    );
    flags
}

fn unit_source() -> String {
    fs::read_to_string(deploy().join("systemd/mesh-agent.service")).unwrap()
}

#[test]
fn the_units_arguments_pass_run_check() {
    let source = unit_source();
    let unit = parse_unit(&source);
    let installs = installs(&source);
    let service = "Service";

    // The environment file is the example beside the unit.
    let env_file = setting(&unit, service, "EnvironmentFile");
    assert!(!env_file.starts_with('-'), "the settings are required");
    assert_eq!(
        installs.get(env_file).map(String::as_str),
        Some("deploy/systemd/mesh-agent.env"),
        "{installs:?}"
    );
    let mut env =
        parse_env_file(&fs::read_to_string(root().join("deploy/systemd/mesh-agent.env")).unwrap());
    // What systemd sets from StateDirectory= and RuntimeDirectory=.
    let state_dir = format!("/var/lib/{}", setting(&unit, service, "StateDirectory"));
    env.insert("STATE_DIRECTORY".to_owned(), state_dir.clone());
    let runtime_dir = format!("/run/{}", setting(&unit, service, "RuntimeDirectory"));
    env.insert("RUNTIME_DIRECTORY".to_owned(), runtime_dir);

    let words = expand_systemd(setting(&unit, service, "ExecStart"), &env);
    assert_eq!(
        installs.get(&words[0]).map(String::as_str),
        Some("mesh-agent"),
        "ExecStart runs the installed agent"
    );
    let mut args = words[1..].to_vec();
    assert_eq!(flag(&args, "--state-dir"), state_dir);
    let bpffs = flag(&args, "--bpffs").to_owned();
    assert!(
        unit[service]["ReadWritePaths"]
            .iter()
            .flat_map(|paths| paths.split_whitespace())
            .any(|path| Path::new(&bpffs).starts_with(path)),
        "--bpffs {bpffs} must be writable"
    );
    let policy = flag(&args, "--policy").to_owned();
    let from = installs
        .get(&policy)
        .unwrap_or_else(|| panic!("the header installs no {policy}"));
    replace_flag(&mut args, "--policy", root().join(from).to_str().unwrap());
    assert_checked(&args, "deploy/systemd");
    assert!(!flag(&args, "--interface").is_empty());

    // The flags of process binding that mesh-agent.env lists, commented
    // out, pass too once added (with a trust bundle where they name one).
    let env_source = fs::read_to_string(root().join("deploy/systemd/mesh-agent.env")).unwrap();
    let binding = commented_flags(&env_source, "process binding");
    assert!(binding.iter().any(|flag| flag.starts_with("--agent-pool")));
    let keys = tempfile::tempdir().unwrap();
    let bundle = keys.path().join("bundle.json");
    let issuer = IssuerKey::generate(Algorithm::EdDsa, None).unwrap();
    fs::write(&bundle, issuer.bundle_json()).unwrap();
    args.extend(binding);
    assert!(flag(&args, "--trust-bundle").starts_with("/etc/mesh/"));
    replace_flag(&mut args, "--trust-bundle", bundle.to_str().unwrap());
    assert_checked(&args, "deploy/systemd with process binding");

    // So do those of the node mesh, with the files they name made as the
    // docs make them, installed where the flags say, and the node's key in
    // its state folder. The check reads the join token against the bundle:
    // one the bundle's key did not sign is refused.
    let mut mesh = args.clone();
    mesh.extend(commented_flags(&env_source, "the node mesh"));
    let join = JoinFiles::make(keys.path());
    for (name, local) in [
        ("--join-token", &join.token),
        ("--mesh-bundle", &join.bundle),
    ] {
        assert!(flag(&mesh, name).starts_with("/etc/mesh/"), "{name}");
        replace_flag(&mut mesh, name, local.to_str().unwrap());
    }
    replace_flag(&mut mesh, "--state-dir", join.state.to_str().unwrap());
    assert_checked(&mesh, "deploy/systemd with the node mesh");
    let output = text(&run_check(&mesh).stdout);
    assert!(
        output.contains(&format!("mesh: join as node {NODE_NAME} ")),
        "{output}"
    );
    replace_flag(&mut mesh, "--mesh-bundle", bundle.to_str().unwrap());
    let refused = run_check(&mesh);
    let stderr = text(&refused.stderr);
    assert!(
        !refused.status.success() && stderr.contains("join token is not valid (unknown_key_id)"),
        "a join token checked against another bundle: {stderr}"
    );

    // A trust bundle that cannot be read is found by the check, and one
    // without a pool is refused: it would bind nothing.
    let without_pool: Vec<String> = args
        .iter()
        .filter(|arg| !arg.starts_with("--agent-pool"))
        .cloned()
        .collect();
    let missing = keys.path().join("missing.json");
    replace_flag(&mut args, "--trust-bundle", missing.to_str().unwrap());
    for (args, error) in [
        (args, missing.to_str().unwrap()),
        (without_pool, "--agent-pool"),
    ] {
        let output = run_check(&args);
        let stderr = text(&output.stderr);
        assert!(
            !output.status.success() && stderr.contains(error),
            "{args:?}: {stderr}"
        );
    }
}

/// `systemd-analyze verify` on a copy of the unit whose agent is the one
/// just built (verify wants the program to exist); any message fails.
fn verify(unit: &str) -> Result<(), String> {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("mesh-agent.service");
    fs::write(
        &file,
        unit.replace(
            "/usr/local/bin/mesh-agent",
            env!("CARGO_BIN_EXE_mesh-agent"),
        ),
    )
    .unwrap();
    let output = run(systemd_analyze().arg("verify").arg(&file), "");
    let said = text(&output.stdout) + &text(&output.stderr);
    if output.status.success() && said.trim().is_empty() {
        Ok(())
    } else {
        Err(format!("{}: {said}", output.status))
    }
}

/// The unit's exposure by `systemd-analyze security`, checked against
/// the ceiling.
fn exposure_within_ceiling(unit: &str) -> Result<(), String> {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("mesh-agent.service");
    fs::write(
        &file,
        unit.replace(
            "/usr/local/bin/mesh-agent",
            env!("CARGO_BIN_EXE_mesh-agent"),
        ),
    )
    .unwrap();
    let output = run(
        systemd_analyze()
            .args(["security", "--offline=true", "--no-pager"])
            .arg(format!("--threshold={SYSTEMD_EXPOSURE_MAX}"))
            .arg(&file),
        "",
    );
    let said = text(&output.stdout) + &text(&output.stderr);
    let overall = said
        .lines()
        .find(|line| line.contains("Overall exposure level"))
        .unwrap_or("no overall exposure level")
        .to_owned();
    if output.status.success() && said.contains("Overall exposure level") {
        Ok(())
    } else {
        Err(format!("{}: {overall}", output.status))
    }
}

#[test]
fn the_unit_verifies() {
    let unit = unit_source();
    verify(&unit).unwrap();
    exposure_within_ceiling(&unit).unwrap();

    // With the drop-in for process binding (its [Service] section appended,
    // as systemd merges it): still valid, within the ceiling, and the cgroup
    // tree writable.
    let drop_in = fs::read_to_string(deploy().join("systemd/process-binding.conf")).unwrap();
    let with_drop_in = format!("{unit}\n{drop_in}");
    verify(&with_drop_in).unwrap();
    exposure_within_ceiling(&with_drop_in).unwrap();
    let drop_in = parse_unit(&drop_in);
    assert_eq!(setting(&drop_in, "Service", "ProtectControlGroups"), "no");
    assert_eq!(
        setting(&drop_in, "Service", "ReadWritePaths"),
        "/sys/fs/cgroup"
    );

    let unit = parse_unit(&unit);
    for (key, value) in [
        ("Restart", "on-failure"),
        ("ProtectSystem", "strict"),
        ("NoNewPrivileges", "yes"),
        ("CapabilityBoundingSet", "CAP_BPF CAP_NET_ADMIN CAP_PERFMON"),
    ] {
        assert_eq!(setting(&unit, "Service", key), value);
    }
}

#[test]
fn broken_units_are_rejected() {
    let unit = unit_source();
    for (what, broken) in [
        (
            "a value systemd does not know",
            unit.replace("Restart=on-failure", "Restart=onfailure"),
        ),
        (
            "a bad sandboxing value",
            unit.replace("ProtectSystem=strict", "ProtectSystem=strictest"),
        ),
        (
            "an unknown setting",
            unit.replace("ProtectSystem=", "ProtectSystemm="),
        ),
        (
            "a missing program",
            unit.replace("/usr/local/bin/mesh-agent", "/nonexistent/mesh-agent"),
        ),
        (
            "a setting outside its section",
            unit.replace("[Service]\n", "[Service]\nWantedBy=multi-user.target\n"),
        ),
    ] {
        assert_ne!(broken, unit, "{what}: the unit did not change");
        assert!(
            verify(&broken).is_err(),
            "{what} passed systemd-analyze verify"
        );
    }
    // Without its sandboxing the unit is over the exposure ceiling.
    let unsandboxed: String = unit
        .lines()
        .filter(|line| {
            !["Protect", "Private", "Restrict", "SystemCall"]
                .iter()
                .any(|prefix| line.starts_with(prefix))
        })
        .map(|line| format!("{line}\n"))
        .collect();
    verify(&unsandboxed).unwrap();
    assert!(exposure_within_ceiling(&unsandboxed).is_err());
}

/// The image puts the agent where the DaemonSet and the unit run it, and
/// builds it as `cargo xtask setup` sets up building.
#[test]
fn the_containerfile_fits_the_deployments() {
    let containerfile = fs::read_to_string(deploy().join("Containerfile")).unwrap();
    let stages: Vec<&str> = containerfile
        .lines()
        .filter(|line| line.starts_with("FROM "))
        .collect();
    assert!(stages.len() >= 2, "a multi-stage build");
    assert!(
        stages.last().unwrap().contains("distroless"),
        "a distroless run stage: {stages:?}"
    );
    let installed = containerfile
        .lines()
        .find_map(|line| line.strip_prefix("COPY --from=build "))
        .and_then(|line| line.split_whitespace().last())
        .expect("COPY --from=build SOURCE DESTINATION");
    assert_eq!(installed, "/usr/local/bin/mesh-agent");
    let docs = kustomize(&deploy().join("kubernetes"));
    assert_eq!(container(&docs)["command"][0], installed);
    let unit = parse_unit(&unit_source());
    assert!(setting(&unit, "Service", "ExecStart").starts_with(&format!("{installed} ")));

    let setup = fs::read_to_string(root().join("xtask/src/setup.rs")).unwrap();
    for name in ["LLVM_MAJOR", "BPF_LINKER_VERSION"] {
        let in_setup = setup
            .lines()
            .find_map(|line| line.strip_prefix(&format!("const {name}: &str = \"")))
            .and_then(|rest| rest.strip_suffix("\";"))
            .unwrap_or_else(|| panic!("{name} not found in setup.rs"));
        assert!(
            containerfile.contains(&format!("ARG {name}={in_setup}\n")),
            "the Containerfile's {name} is not setup.rs's {in_setup}"
        );
    }
    // The Debian packages the agent's build needs (protoc and the protobuf
    // well-known types, for the etcd client's gRPC code), installed in the
    // build stage as setup.rs installs them.
    let build_stage = containerfile
        .split("\nFROM ")
        .find(|stage| stage.contains(" AS build"))
        .expect("a build stage");
    let apt_install = build_stage
        .split("RUN ")
        .find(|run| run.contains("apt-get install"))
        .expect("the build stage installs Debian packages");
    for package in ["protobuf-compiler", "libprotobuf-dev"] {
        assert!(
            setup.contains(&format!("\"{package}\",")),
            "setup.rs installs no {package}"
        );
        assert!(
            apt_install.split_whitespace().any(|word| word == package),
            "the Containerfile's build stage installs no {package}"
        );
    }
}

/// The capabilities the deployments give the agent, in setpriv's spelling
/// (`bpf`, `net_admin`, …): what the DaemonSet's container adds after
/// dropping all, which must be the unit's bounding set. Both run the agent
/// as root without new privileges.
fn granted_capabilities() -> Vec<String> {
    let docs = kustomize(&deploy().join("kubernetes"));
    let security = &container(&docs)["securityContext"];
    assert_eq!(security["runAsUser"], 0);
    assert_eq!(security["allowPrivilegeEscalation"], false);
    assert_eq!(security["capabilities"]["drop"], serde_json::json!(["ALL"]));
    let mut pod: Vec<String> = list(&security["capabilities"]["add"])
        .iter()
        .map(|cap| cap.as_str().unwrap().to_ascii_lowercase())
        .collect();
    let unit = parse_unit(&unit_source());
    assert_eq!(setting(&unit, "Service", "NoNewPrivileges"), "yes");
    assert!(
        !unit["Service"].contains_key("User"),
        "the unit runs as root"
    );
    let mut bounded: Vec<String> = setting(&unit, "Service", "CapabilityBoundingSet")
        .split_whitespace()
        .map(|cap| cap.strip_prefix("CAP_").unwrap().to_ascii_lowercase())
        .collect();
    pod.sort();
    bounded.sort();
    assert_eq!(pod, bounded, "the DaemonSet and the unit grant the same");
    pod
}

/// The bit of a capability in /proc/PID/status (linux/capability.h).
fn capability_bit(name: &str) -> u64 {
    let number = match name {
        "net_admin" => 12,
        "perfmon" => 38,
        "bpf" => 39,
        _ => panic!("no number for capability {name} in the test"),
    };
    1 << number
}

/// `mesh-agent run` on the server's veth, as root with only `caps` (the
/// bounding set, hence also what root's exec keeps) and no new privileges,
/// as the DaemonSet's runtime and the unit's systemd start it. Killed on
/// drop; its stderr goes to a file, for failure messages.
struct RestrictedAgent {
    child: std::process::Child,
    stderr: PathBuf,
}

impl RestrictedAgent {
    fn start(
        net: &ClientServer,
        caps: &[String],
        pins: &Path,
        dir: &Path,
        run: usize,
    ) -> anyhow::Result<Self> {
        let bounding: String = caps.iter().map(|cap| format!(",+{cap}")).collect();
        let stderr = dir.join(format!("agent-{run}.log"));
        let child = net
            .server
            .command("setpriv")?
            .args(["--reuid=0", "--regid=0", "--clear-groups", "--no-new-privs"])
            .args(["--inh-caps=-all", "--ambient-caps=-all"])
            .arg(format!("--bounding-set=-all{bounding}"))
            .arg(env!("CARGO_BIN_EXE_mesh-agent"))
            .args(["run", "--interface", "veth-s", "--policy"])
            .arg(dir.join("policy.toml"))
            .arg("--bpffs")
            .arg(pins)
            .arg("--state-dir")
            .arg(dir.join("state"))
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(fs::File::create(&stderr)?)
            .spawn()?;
        Ok(Self { child, stderr })
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Waits until /readyz answers 200; fails with the agent's log if it
    /// exits or takes longer than 15 s.
    fn wait_ready(&mut self, net: &ClientServer) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = self.child.try_wait()? {
                anyhow::bail!("the agent exited ({status}):\n{}", self.log());
            }
            if http_get(&net.server, METRICS, "/readyz")
                .is_ok_and(|response| response.starts_with("HTTP/1.1 200"))
            {
                return Ok(());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "not ready after 15 s:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits up to 15 s for the agent to exit by itself.
    fn wait_exit(&mut self) -> anyhow::Result<std::process::ExitStatus> {
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        anyhow::bail!("the agent still runs after 15 s:\n{}", self.log())
    }

    /// The capability sets of the running agent, from /proc: (effective,
    /// bounding).
    fn capabilities(&self) -> anyhow::Result<(u64, u64)> {
        let status = fs::read_to_string(format!("/proc/{}/status", self.child.id()))?;
        let set = |name: &str| -> anyhow::Result<u64> {
            let hex = status
                .lines()
                .find_map(|line| line.strip_prefix(name))
                .ok_or_else(|| anyhow::anyhow!("no {name} in /proc"))?;
            Ok(u64::from_str_radix(hex.trim(), 16)?)
        };
        Ok((set("CapEff:")?, set("CapBnd:")?))
    }
}

impl Drop for RestrictedAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The agent runs on exactly the capabilities the DaemonSet and the unit
/// grant: it starts, attaches, answers /readyz, enforces, applies a change
/// live and, restarted, adopts its pins; and with any one of them left out
/// it cannot start, so none of them is superfluous. (A node has its bpffs
/// mounted already; mounting one is the only thing the agent would need
/// CAP_SYS_ADMIN for.)
#[test]
fn the_agent_runs_with_only_the_granted_capabilities() -> anyhow::Result<()> {
    const PACKETS: usize = 10;
    let patience = Duration::from_millis(500);
    require_root();
    let caps = granted_capabilities();
    let net = ClientServer::new()?;
    let dir = tempfile::tempdir()?;
    fs::write(
        dir.path().join("policy.toml"),
        client_server_policy(&[7000]),
    )?;
    let mut starts = 0;

    for missing in &caps {
        let fewer: Vec<String> = caps.iter().filter(|cap| *cap != missing).cloned().collect();
        let bpffs = BpfFs::mount()?;
        starts += 1;
        let mut agent =
            RestrictedAgent::start(&net, &fewer, &bpffs.path().join("mesh"), dir.path(), starts)?;
        let status = agent.wait_exit()?;
        let log = agent.log();
        assert!(!status.success(), "without {missing} the agent started");
        assert!(
            log.contains("Operation not permitted") || log.contains("Permission denied"),
            "without {missing}, refused by the kernel:\n{log}"
        );
        let links = net.server.ip(&["-d", "link", "show", "veth-s"])?;
        assert!(!links.contains("xdp"), "without {missing}: {links}");
    }

    let bpffs = BpfFs::mount()?;
    let pins = bpffs.path().join("mesh");
    starts += 1;
    let mut agent = RestrictedAgent::start(&net, &caps, &pins, dir.path(), starts)?;
    agent.wait_ready(&net)?;
    let mask = caps
        .iter()
        .map(|cap| capability_bit(cap))
        .fold(0, |a, b| a | b);
    assert_eq!(
        agent.capabilities()?,
        (mask, mask),
        "the agent holds exactly the granted capabilities"
    );
    let healthz = http_get(&net.server, METRICS, "/healthz")?;
    assert!(healthz.starts_with("HTTP/1.1 200"), "{healthz}");
    assert_eq!(
        net.udp_delivered(7000, PACKETS, patience)?,
        PACKETS,
        "granted"
    );
    assert_eq!(
        net.udp_delivered(7001, PACKETS, patience)?,
        0,
        "not granted"
    );
    let status = text(
        &Command::new(env!("CARGO_BIN_EXE_mesh-agent"))
            .args(["status", "--bpffs"])
            .arg(&pins)
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .output()?
            .stdout,
    );
    assert!(status.contains("agent: running"), "{status}");
    assert!(status.contains("attached: veth-s xdp"), "{status}");
    assert!(status.contains("attached: veth-s tc-egress"), "{status}");

    // A restart (an upgrade, a rescheduled pod) adopts the pins with the
    // same capabilities, and the maps take live changes.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent.child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )?;
    assert!(agent.wait_exit()?.success(), "{}", agent.log());
    starts += 1;
    let mut agent = RestrictedAgent::start(&net, &caps, &pins, dir.path(), starts)?;
    agent.wait_ready(&net)?;
    assert!(
        agent.log().contains("adopted the pinned datapath"),
        "{}",
        agent.log()
    );
    assert_eq!(
        net.udp_delivered(7000, PACKETS, patience)?,
        PACKETS,
        "adopted"
    );
    assert_eq!(net.udp_delivered(7001, PACKETS, patience)?, 0);
    let aside = dir.path().join(".policy.toml.new");
    fs::write(&aside, client_server_policy(&[7000, 7001]))?;
    fs::rename(&aside, dir.path().join("policy.toml"))?;
    let deadline = Instant::now() + Duration::from_secs(5);
    while net.udp_delivered(7001, PACKETS, patience)? != PACKETS {
        assert!(
            Instant::now() < deadline,
            "a grant added live did not take effect:\n{}",
            agent.log()
        );
    }
    Ok(())
}
