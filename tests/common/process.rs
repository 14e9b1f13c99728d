//! `portcullis serve` as a child process: its stderr read line by line, SIGTERM.

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

use super::{Gateways, Keys};
use portcullis::pb;

pub const BIN: &str = env!("CARGO_BIN_EXE_portcullis");

pub struct Proc {
    pub child: Child,
    lines: mpsc::UnboundedReceiver<String>,
    log: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    pub fn spawn(db: &str, authz: u16, admin: u16, env: &[(&str, &str)]) -> Proc {
        let mut cmd = Command::new(BIN);
        cmd.args(["serve", "--database-url", db])
            .args(["--authz-addr", &format!("127.0.0.1:{authz}"), "--admin-addr", &format!("127.0.0.1:{admin}")])
            .env_remove("PORTCULLIS_BOOTSTRAP_TOKEN")
            .env("PORTCULLIS_LOG", "debug")
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        let (tx, lines) = mpsc::unbounded_channel();
        let log = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&log);
        let mut reader = BufReader::new(child.stderr.take().unwrap()).lines();
        tokio::spawn(async move {
            while let Ok(Some(line)) = reader.next_line().await {
                sink.lock().unwrap().push(line.clone());
                let _ = tx.send(line);
            }
        });
        Proc { child, lines, log }
    }

    /// Waits for a stderr line containing `needle`; returns every line read on the way.
    pub async fn wait_for(&mut self, needle: &str) -> Vec<String> {
        let mut seen = Vec::new();
        let found = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(line) = self.lines.recv().await {
                let hit = line.contains(needle);
                seen.push(line);
                if hit {
                    return true;
                }
            }
            false
        })
        .await;
        assert!(matches!(found, Ok(true)), "no '{needle}' in stderr: {seen:#?}");
        seen
    }

    pub async fn sigterm(mut self) -> (std::process::ExitStatus, Vec<String>) {
        let pid = self.child.id().unwrap().to_string();
        assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
        let status = tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await.unwrap().unwrap();
        let log = self.log.lock().unwrap().clone();
        (status, log)
    }
}

/// Admin clients of a process serving on `admin`, as `token`.
pub async fn clients(admin: u16, token: &str) -> (Gateways, Keys) {
    let ch =
        tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{admin}")).unwrap().connect().await.unwrap();
    let auth = portcullis::cli::BearerAuth::new(token).unwrap();
    (
        pb::gateway_service_client::GatewayServiceClient::with_interceptor(ch.clone(), auth.clone()),
        pb::key_service_client::KeyServiceClient::with_interceptor(ch, auth),
    )
}
