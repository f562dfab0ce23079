//! `muster bench`: the load generator of `muster-bench`, with the global
//! flags' endpoints, TLS settings, `--user` and output format.

use crate::global::{GlobalArgs, Output};

pub use muster_bench::BenchArgs;

/// Runs the workload and prints its report. Fails (after printing the
/// report) if any request failed.
pub async fn run(global: &GlobalArgs, args: BenchArgs) -> anyhow::Result<()> {
    let endpoints = global.endpoint_urls()?;
    let format = match global.output {
        Output::Table => muster_bench::Format::Text,
        Output::Json => muster_bench::Format::Json,
    };
    let tls = global.tls()?;
    let credentials = global
        .credentials()?
        .map(|(user, password)| muster_bench::Credentials::new(user, password));
    muster_bench::run(
        &args,
        &endpoints,
        tls.as_ref(),
        credentials.as_ref(),
        format,
        std::io::stdout(),
    )
    .await?;
    Ok(())
}
