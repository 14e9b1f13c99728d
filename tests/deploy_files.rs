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

#[test]
fn docker_compose_matches_the_repository() {
    let out = std::process::Command::new("python3")
        .arg(manifest_dir().join("tools/check_compose.py"))
        .output()
        .expect("python3 runs");
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
}
