//! `loopsync sim`: the local Loops API simulator.

use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use loopsync_simulator::{
    EmailMatch, MailingList, NumericDates, PropertyType, RateWindow, Settings, SimConfig,
};

#[derive(Debug, Args)]
pub struct SimArgs {
    /// Port to listen on; 0 picks a free one (the address is printed on the first line).
    #[arg(long, default_value_t = 8788)]
    port: u16,
    /// Address to bind; loopback unless told otherwise.
    #[arg(long, default_value = "127.0.0.1")]
    bind: IpAddr,
    /// Requests per second for the simulated team.
    #[arg(long, default_value_t = 10)]
    rate_limit: u32,
    /// The API key the simulator accepts; repeatable: several keys of the one team (as Loops
    /// allows), e.g. to rotate a key with the contacts kept.
    #[arg(
        long = "api-key",
        default_value = "test-key",
        env = "LOOPSYNC_SIM_API_KEY",
        value_delimiter = ','
    )]
    api_keys: Vec<String>,
    /// How the rate limit counts: sliding, fixed, or token-bucket.
    #[arg(long, default_value = "sliding", value_parser = parse_window)]
    window: RateWindow,
    /// Send Retry-After on 429 (Loops does not document sending it).
    #[arg(long)]
    retry_after: bool,
    /// A request that carried an Idempotency-Key and failed (400, 413, an injected 5xx or a
    /// dropped connection; not a 401 or 429) consumes its key, so a retry with it gets 409.
    #[arg(long)]
    keys_consumed_on_failure: bool,
    /// How long an Idempotency-Key is remembered, in seconds (Loops: 24 hours); shorter to see
    /// what happens once Loops has forgotten a key.
    #[arg(long, default_value_t = loopsync_simulator::DEFAULT_IDEMPOTENCY_TTL_SECONDS)]
    idempotency_ttl_seconds: u64,
    /// How contacts are matched by email: case-insensitive or case-sensitive.
    #[arg(long, default_value = "case-insensitive", value_parser = parse_email_match)]
    email_match: EmailMatch,
    /// How a number in a date property is read: auto (below 10^11 Unix seconds, otherwise
    /// milliseconds) or millis (always Unix milliseconds).
    #[arg(long, default_value = "auto", value_parser = parse_numeric_dates)]
    numeric_dates: NumericDates,
    /// A mailing list the team has, as ID=NAME; repeatable.
    #[arg(long = "list", value_parser = parse_list)]
    lists: Vec<MailingList>,
    /// A custom contact property the team has, as NAME:TYPE; repeatable.
    #[arg(long = "property", value_parser = parse_property)]
    properties: Vec<(String, PropertyType)>,
}

fn parse_window(s: &str) -> Result<RateWindow, String> {
    match s {
        "sliding" => Ok(RateWindow::Sliding),
        "fixed" => Ok(RateWindow::Fixed),
        "token-bucket" | "token_bucket" => Ok(RateWindow::TokenBucket),
        other => Err(format!(
            "`{other}` is not a window: use sliding, fixed or token-bucket"
        )),
    }
}

fn parse_email_match(s: &str) -> Result<EmailMatch, String> {
    match s {
        "case-insensitive" | "case_insensitive" => Ok(EmailMatch::CaseInsensitive),
        "case-sensitive" | "case_sensitive" => Ok(EmailMatch::CaseSensitive),
        other => Err(format!(
            "`{other}` is not an email match: use case-insensitive or case-sensitive"
        )),
    }
}

fn parse_numeric_dates(s: &str) -> Result<NumericDates, String> {
    match s {
        "auto" => Ok(NumericDates::Auto),
        "millis" => Ok(NumericDates::Millis),
        other => Err(format!(
            "`{other}` is not a reading of numeric dates: use auto or millis"
        )),
    }
}

fn parse_list(s: &str) -> Result<MailingList, String> {
    let (id, name) = s
        .split_once('=')
        .ok_or_else(|| format!("`{s}`: write a list as ID=NAME"))?;
    Ok(MailingList {
        id: id.trim().to_owned(),
        name: name.trim().to_owned(),
        description: None,
        is_public: true,
    })
}

fn parse_property(s: &str) -> Result<(String, PropertyType), String> {
    let (name, kind) = s
        .split_once(':')
        .ok_or_else(|| format!("`{s}`: write a property as NAME:TYPE"))?;
    Ok((name.trim().to_owned(), kind.trim().parse()?))
}

pub async fn run(args: SimArgs) -> anyhow::Result<ExitCode> {
    let config = SimConfig {
        bind: SocketAddr::new(args.bind, args.port),
        api_key: args.api_keys.first().cloned().unwrap_or_default(),
        other_api_keys: args.api_keys.iter().skip(1).cloned().collect(),
        settings: Settings {
            rate_limit: args.rate_limit,
            window: args.window,
            retry_after: args.retry_after,
            keys_consumed_on_failure: args.keys_consumed_on_failure,
            email_match: args.email_match,
            numeric_dates: args.numeric_dates,
            idempotency_ttl_seconds: args.idempotency_ttl_seconds,
            ..Settings::default()
        },
        lists: args.lists,
        properties: args.properties,
        ..SimConfig::default()
    };
    let listener = tokio::net::TcpListener::bind(config.bind)
        .await
        .with_context(|| format!("cannot listen on {}", config.bind))?;
    let addr = listener.local_addr()?;
    // The first line is for scripts that started us on port 0.
    crate::say!("loopsync sim listening on http://{addr}/api");
    std::io::stdout().flush()?;
    loopsync_simulator::serve(listener, config, crate::common::shutdown_signal()).await;
    Ok(ExitCode::SUCCESS)
}
