//! Test certificates, made at test time with the `openssl` command-line tool (not a
//! dependency of the binary): a CA, Portcullis' server certificate (SAN `portcullis`,
//! `localhost`, `127.0.0.1`), Envoy's client certificate, and a client certificate of
//! another CA that Portcullis must refuse.

use std::path::{Path, PathBuf};
use std::process::Command;

const OPENSSL_CNF: &str = "\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = Portcullis test CA
[ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[server]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = DNS:portcullis, DNS:localhost, IP:127.0.0.1
[client]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = clientAuth
subjectAltName = DNS:envoy
";

/// A directory of PEM files: `ca.pem`, `server.pem`/`server-key.pem`,
/// `envoy.pem`/`envoy-key.pem` (signed by `ca.pem`), and `rogue.pem`/`rogue-key.pem`
/// (signed by `rogue-ca.pem`).
pub struct TestCerts {
    pub dir: tempfile::TempDir,
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("the openssl command-line tool runs (apt-get install openssl)");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

fn self_signed_ca(dir: &Path, name: &str) {
    let (key, cert) = (format!("{name}-key.pem"), format!("{name}.pem"));
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &cert,
            "-days",
            "2",
            "-config",
            "openssl.cnf",
            "-extensions",
            "ca",
            "-subj",
            &format!("/CN={name}"),
        ],
    );
}

fn leaf(dir: &Path, ca: &str, name: &str, cn: &str, extensions: &str) {
    let (key, cert, csr) = (format!("{name}-key.pem"), format!("{name}.pem"), format!("{name}.csr"));
    openssl(
        dir,
        &[
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &csr,
            "-config",
            "openssl.cnf",
            "-subj",
            &format!("/CN={cn}"),
        ],
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &format!("{ca}.pem"),
            "-CAkey",
            &format!("{ca}-key.pem"),
            "-CAcreateserial",
            "-out",
            &cert,
            "-days",
            "2",
            "-extfile",
            "openssl.cnf",
            "-extensions",
            extensions,
        ],
    );
}

impl TestCerts {
    pub fn generate() -> TestCerts {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join("openssl.cnf"), OPENSSL_CNF).unwrap();
        self_signed_ca(d, "ca");
        leaf(d, "ca", "server", "portcullis", "server");
        leaf(d, "ca", "envoy", "envoy", "client");
        self_signed_ca(d, "rogue-ca");
        leaf(d, "rogue-ca", "rogue", "envoy", "client");
        TestCerts { dir }
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }

    /// `path` as a string, for flags.
    pub fn arg(&self, file: &str) -> String {
        self.path(file).display().to_string()
    }

    pub fn read(&self, file: &str) -> Vec<u8> {
        std::fs::read(self.path(file)).unwrap()
    }

    /// envoy/loopback-mtls.yaml with `__TLS_DIR__` filled in, as an edit for `Envoy::start_with`.
    pub fn mtls_envoy_config(&self) -> impl FnOnce(String) -> String + use<> {
        let dir = self.dir.path().display().to_string();
        move |_loopback| {
            std::fs::read_to_string(super::manifest_dir().join("envoy/loopback-mtls.yaml"))
                .unwrap()
                .replace("__TLS_DIR__", &dir)
        }
    }
}
