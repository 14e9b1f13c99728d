//! Portcullis: API keys with limits for LLM gateways built on Envoy.

#![forbid(unsafe_code)]

pub mod admin;
pub mod app;
pub mod authz;
pub mod cli;
pub mod config;
pub mod console;
pub mod domain;
pub mod listen;
pub mod metrics;
pub mod pem;
pub mod shared_counters;
pub mod state;
pub mod store;
pub mod sync;
pub mod upkeep;

use std::process::ExitCode;

use config::{Cli, Command};

/// Our own admin protos, compiled by `build.rs`.
pub mod pb {
    tonic::include_proto!("portcullis.admin.v1");

    /// Descriptor set for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("portcullis_descriptor");

    /// The name gRPC gives a status code on the wire and in docs: `PERMISSION_DENIED` for
    /// `Code::PermissionDenied` (the admin API's audit trail and the CLI's errors).
    pub fn code_name(code: tonic::Code) -> String {
        let debug = format!("{code:?}");
        let mut out = String::new();
        for (i, c) in debug.chars().enumerate() {
            if c.is_uppercase() && i > 0 {
                out.push('_');
            }
            out.push(c.to_ascii_uppercase());
        }
        out
    }
}

fn init_tracing(filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter).unwrap_or_else(|_| "info".into());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .try_init();
}

/// Runs one command line. Errors print as one line and exit non-zero.
pub async fn run(cli: Cli) -> ExitCode {
    let result = match cli.command {
        Command::Serve(args) => {
            init_tracing(&args.log);
            app::serve(args).await
        }
        Command::Migrate(db) => app::migrate(&db.database_url).await,
        Command::Backup(args) => app::backup(&args.database.database_url, &args.file).await,
        Command::Admin(cmd) => cli::run(cmd, cli.conn).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
