//! `muster certs`: a CA, a server certificate and a client certificate for
//! first steps with TLS (`muster serve --cert-file ...`, `muster ls
//! --cacert ...`), as consul's `tls ca create` / `tls cert create`.
//! Production certificates come from your own PKI (cert-manager, Vault,
//! cfssl); muster reads any PEM.

use std::path::PathBuf;
use std::time::SystemTime;

use anyhow::{Context, bail};
use muster_tls::generate::{Authority, DAY, Leaf, write_atomically};

/// Flags of `muster certs`.
#[derive(Debug, clap::Args)]
pub struct CertsArgs {
    /// Where to write ca.pem, server.pem, server-key.pem, client.pem and
    /// client-key.pem.
    #[arg(long, default_value = "./muster-certs")]
    dir: PathBuf,
    /// A name or IP address the server certificate is valid for, besides
    /// 127.0.0.1 and localhost (repeat for several).
    #[arg(long = "host", value_name = "NAME_OR_IP")]
    hosts: Vec<String>,
    /// The client certificate's common name (etcd's user name when auth
    /// takes the name from client certificates).
    #[arg(long, default_value = "root")]
    client_cn: String,
    /// How long the certificates are valid, in days.
    #[arg(long, default_value_t = 365)]
    days: u32,
    /// Replace files that exist.
    #[arg(long)]
    force: bool,
}

const FILES: [&str; 5] = [
    "ca.pem",
    "server.pem",
    "server-key.pem",
    "client.pem",
    "client-key.pem",
];

/// Writes the files and says how to use them.
pub fn run(args: CertsArgs) -> anyhow::Result<()> {
    if args.days == 0 {
        bail!("--days must be positive");
    }
    if args.client_cn.trim().is_empty() {
        bail!("--client-cn is empty");
    }
    let mut sans: Vec<&str> = vec!["127.0.0.1", "localhost"];
    for host in &args.hosts {
        let host = host.trim();
        if host.is_empty()
            || host.contains(['/', ' ', ':']) && host.parse::<std::net::IpAddr>().is_err()
        {
            bail!("--host {host:?}: a DNS name or an IP address");
        }
        if !sans.contains(&host) {
            sans.push(host);
        }
    }
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("cannot create {}", args.dir.display()))?;
    if !args.force
        && let Some(existing) = FILES.iter().map(|f| args.dir.join(f)).find(|p| p.exists())
    {
        bail!(
            "{} exists: pass --force to replace the certificates in {}",
            existing.display(),
            args.dir.display()
        );
    }
    let valid = DAY * args.days;
    let ca = Authority::new("muster CA", "muster", valid)?;
    let now = SystemTime::now();
    let server = ca.issue(
        Leaf::Server { sans: &sans },
        "muster",
        now - DAY,
        now + valid,
    )?;
    let client = ca.issue(
        Leaf::Client {
            cn: &args.client_cn,
        },
        "muster",
        now - DAY,
        now + valid,
    )?;
    let dir = &args.dir;
    write_atomically(&dir.join("ca.pem"), ca.cert_pem(), false)?;
    write_atomically(&dir.join("server-key.pem"), &server.key_pem, true)?;
    write_atomically(&dir.join("server.pem"), &server.cert_pem, false)?;
    write_atomically(&dir.join("client-key.pem"), &client.key_pem, true)?;
    write_atomically(&dir.join("client.pem"), &client.cert_pem, false)?;
    let d = dir.display();
    println!("wrote {d}/{{{}}}", FILES.join(","));
    println!(
        "  server certificate for {}, client certificate CN {:?}, valid {} days",
        sans.join(", "),
        args.client_cn,
        args.days
    );
    println!("  the CA's key was not kept: run again (--force) to issue new ones");
    println!();
    println!(
        "muster serve --cert-file {d}/server.pem --key-file {d}/server-key.pem --trusted-ca-file {d}/ca.pem --client-cert-auth"
    );
    println!(
        "muster ls --endpoints https://127.0.0.1:2379 --cacert {d}/ca.pem --cert {d}/client.pem --key {d}/client-key.pem"
    );
    Ok(())
}
