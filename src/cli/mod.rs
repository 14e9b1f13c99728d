//! The admin client: `portcullis gateways …`, `portcullis keys …`.
//! Tables for people, `--json` for scripts, one-line errors.
//!
//! `args` holds the clap types, `connect` the channel to the admin API, and one file per
//! resource runs its commands (`gateways`, `keys`, `tokens`, `prices`, `audit`; `history` for
//! both keys and gateways), printing through `output`.

mod args;
mod audit;
mod connect;
mod gateways;
mod history;
mod keys;
mod output;
mod prices;
mod time;
mod tokens;

pub use args::{
    AuditArgs, CliCommand, Connection, GatewaySettings, GatewaysCmd, GranularityArg, HistoryArgs, KeysCmd, LimitArgs,
    Location, OrderArg, Period, PricesCmd, RoleArg, StatusArg, TokensCmd,
};
pub use connect::BearerAuth;

pub async fn run(cmd: CliCommand, conn: Connection) -> anyhow::Result<()> {
    let conn = &conn;
    match cmd {
        CliCommand::Gateways { cmd } => gateways::run(conn, cmd).await,
        CliCommand::Keys { cmd } => keys::run(conn, cmd).await,
        CliCommand::Prices { cmd } => prices::run(conn, cmd).await,
        CliCommand::Tokens { cmd } => tokens::run(conn, cmd).await,
        CliCommand::Audit(args) => audit::run(conn, args).await,
    }
}
