//! The deployment files users run but this machine cannot: docker-compose.yml and the
//! Envoy configs, validated by the real Envoy binary and by tools/check_compose.py.

mod common;

use common::{envoy_bin, manifest_dir};

fn envoy_validates(path: &std::path::Path) {
    let out = std::process::Command::new(envoy_bin())
        .args(["--mode", "validate", "--use-dynamic-base-id", "-l", "error", "-c"])
        .arg(path)
        .output()
        .expect("envoy runs (scripts/install-envoy.sh)");
    assert!(
        out.status.success(),
        "{} is invalid:\n{}{}",
        path.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn docker_envoy_config_is_valid() {
    envoy_validates(&manifest_dir().join("envoy/docker.yaml"));
}

#[test]
fn loopback_envoy_config_is_valid_once_filled_in() {
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(manifest_dir().join("envoy/loopback.yaml")).unwrap();
    let filled = text
        .replace("__LISTEN_PORT__", "10000")
        .replace("__ADMIN_PORT__", "9901")
        .replace("__AUTHZ_PORT__", "50051")
        .replace("__UPSTREAM_PORT__", "8081");
    assert!(!filled.contains("__"), "an unknown placeholder is left");
    let path = dir.path().join("envoy.yaml");
    std::fs::write(&path, filled).unwrap();
    envoy_validates(&path);
}

#[test]
fn mtls_envoy_config_is_valid_once_filled_in_and_is_the_loopback_config_plus_tls() {
    let certs = common::tls::TestCerts::generate();
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(manifest_dir().join("envoy/loopback-mtls.yaml")).unwrap();
    let filled = text
        .replace("__LISTEN_PORT__", "10000")
        .replace("__ADMIN_PORT__", "9901")
        .replace("__AUTHZ_PORT__", "50051")
        .replace("__UPSTREAM_PORT__", "8081")
        .replace("__TLS_DIR__", &certs.dir.path().display().to_string());
    assert!(!filled.contains("__"), "an unknown placeholder is left");
    let path = dir.path().join("envoy.yaml");
    std::fs::write(&path, filled).unwrap();
    envoy_validates(&path);

    // Without its header comment and the portcullis cluster's transport_socket, it is
    // loopback.yaml: the two cannot drift apart.
    let plain = std::fs::read_to_string(manifest_dir().join("envoy/loopback.yaml")).unwrap();
    let body = |s: &str| -> Vec<String> {
        let mut out = Vec::new();
        let mut skipping = false;
        for line in s.lines().skip_while(|l| l.starts_with('#')) {
            if line == "    transport_socket:" {
                skipping = true;
                continue;
            }
            if skipping && line.starts_with("     ") {
                continue;
            }
            skipping = false;
            out.push(line.to_string());
        }
        out
    };
    assert!(text.contains("    transport_socket:\n"), "the mTLS config has a transport_socket");
    assert_eq!(body(&text), body(&plain));
}

/// tools/check_compose.py on the files under `root` (this repository when None): (passed, its output).
fn check_compose(root: Option<&std::path::Path>) -> (bool, String) {
    let mut cmd = std::process::Command::new("python3");
    cmd.arg(manifest_dir().join("tools/check_compose.py"));
    if let Some(root) = root {
        cmd.arg("--root").arg(root);
    }
    let out = cmd.output().expect("python3 runs");
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

#[test]
fn docker_compose_matches_the_repository() {
    let (ok, out) = check_compose(None);
    assert!(ok, "{out}");
}

/// Writes a copy of the compose stack (docker-compose.yml, envoy/docker.yaml and what they
/// mount or build) under `dir`, after running the Python statement `edit` on the parsed
/// `compose` and `envoy` documents (`authz` is Envoy's portcullis_authz cluster).
const EDITED_COPY: &str = r#"
import json, os, shutil, sys, yaml
repo, dir, edit = sys.argv[1:]
load = lambda p: json.loads(json.dumps(yaml.safe_load(open(os.path.join(repo, p)))))  # no shared anchors
compose, envoy = load("docker-compose.yml"), load("envoy/docker.yaml")
authz = next(c for c in envoy["static_resources"]["clusters"] if c["name"] == "portcullis_authz")
exec(edit)
os.makedirs(os.path.join(dir, "envoy")); os.makedirs(os.path.join(dir, "tools"))
yaml.safe_dump(compose, open(os.path.join(dir, "docker-compose.yml"), "w"))
yaml.safe_dump(envoy, open(os.path.join(dir, "envoy/docker.yaml"), "w"))
shutil.copy(os.path.join(repo, "Dockerfile"), dir)
shutil.copy(os.path.join(repo, "tools/fake_upstream.py"), os.path.join(dir, "tools"))
"#;

#[test]
fn docker_compose_check_refuses_a_stack_that_lost_a_replica_or_its_shared_state() {
    let svc = "compose['services']";
    let cases = [
        (format!("del {svc}['portcullis-2']"), "at least two portcullis replicas"),
        ("authz['load_assignment']['endpoints'][0]['lb_endpoints'].pop()".into(), "does not list portcullis-2:50051"),
        (
            format!("{svc}['portcullis-3'] = dict({svc}['portcullis-2'], ports=['127.0.0.1:50054:50052'])"),
            "does not list portcullis-3",
        ),
        (format!("del {svc}['portcullis-1']['environment']['PORTCULLIS_REDIS_URL']"), "portcullis-1: --redis-url"),
        (
            format!("{svc}['portcullis-2']['environment']['PORTCULLIS_DATABASE_URL'] = 'sqlite:///data/portcullis.db'"),
            "portcullis-2: --database-url",
        ),
        (format!("{svc}['portcullis-2']['ports'] = ['127.0.0.1:50052:50052']"), "admin host port 50052"),
        (format!("del {svc}['portcullis-2']['depends_on']['postgres']"), "portcullis-2: must depend on postgres"),
        (format!("{svc}['redis']['command'] = ['redis-server']"), "--appendonly yes"),
        (format!("{svc}['redis']['volumes'] = []"), "redis: /data is not on a named volume"),
        (format!("del {svc}['postgres']['healthcheck']"), "postgres: no pg_isready healthcheck"),
        ("del authz['health_checks']".into(), "no gRPC health check"),
        ("del authz['health_checks'][0]['no_traffic_interval']".into(), "no_traffic_interval"),
    ];
    let copy = |edit: &str| {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("stack");
        let out = std::process::Command::new("python3")
            .args(["-c", EDITED_COPY])
            .arg(manifest_dir())
            .arg(&root)
            .arg(edit)
            .output()
            .expect("python3 runs");
        assert!(out.status.success(), "{edit}: {}", String::from_utf8_lossy(&out.stderr));
        let checked = check_compose(Some(&root));
        (dir, checked)
    };
    // The copy itself, unedited, passes: every refusal below is the edit's.
    let (_dir, (ok, out)) = copy("pass");
    assert!(ok, "an unedited copy is refused:\n{out}");
    for (edit, problem) in cases {
        let (_dir, (ok, out)) = copy(&edit);
        assert!(!ok && out.contains(problem), "after `{edit}` the check should report {problem:?}, got:\n{out}");
    }
}
