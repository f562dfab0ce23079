//! `muster snapshot save|restore|status`: etcd's `Maintenance.Snapshot`
//! saved to a file, a muster snapshot restored into a new data directory,
//! and a snapshot file summarized.
//!
//! `save` works against `muster serve` (our format, see
//! `muster_server::snapshot`) and against etcd (a bbolt file): both streams
//! end with the SHA-256 of what precedes it, which `save` checks before
//! keeping the file. `restore` and `status` read muster snapshots only (an
//! etcd one is restored with `etcdutl snapshot restore`).

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail};
use muster_proto as pb;
use muster_server::snapshot as format;
use tonic::transport::{Channel, Endpoint};

use crate::global::{GlobalArgs, Output};
use crate::output::{Table, print, print_json};

/// `muster snapshot`.
#[derive(Debug, clap::Subcommand)]
pub enum SnapshotCommand {
    /// Saves a snapshot of the (single) endpoint to FILE (written to
    /// FILE.part, checked against its SHA-256 trailer, synced, renamed).
    Save {
        /// The file to write.
        file: PathBuf,
    },
    /// Restores a muster snapshot into a new data directory, for
    /// `muster serve --data-dir DIR`. Leases get their full TTL again when
    /// the restored server starts, as etcd's do after a restore.
    Restore {
        /// The snapshot file.
        file: PathBuf,
        /// The data directory to create (missing or empty).
        #[arg(long)]
        data_dir: PathBuf,
    },
    /// Checks a muster snapshot and prints its hash (CRC-32 IEEE of the
    /// content before the SHA-256 trailer), revision, keys and size.
    Status {
        /// The snapshot file.
        file: PathBuf,
    },
}

/// Runs `muster snapshot ...`.
pub async fn run(global: &GlobalArgs, command: SnapshotCommand) -> anyhow::Result<()> {
    match command {
        SnapshotCommand::Save { file } => save(global, &file).await,
        SnapshotCommand::Restore { file, data_dir } => {
            tokio::task::spawn_blocking(move || restore(&file, &data_dir)).await?
        }
        SnapshotCommand::Status { file } => status(global, &file),
    }
}

async fn connect(global: &GlobalArgs, url: &str) -> anyhow::Result<Channel> {
    let secure = url.starts_with("https://");
    let dial = if secure {
        url.replacen("https://", "http://", 1)
    } else {
        url.to_string()
    };
    let endpoint = Endpoint::from_shared(dial)
        .with_context(|| format!("invalid endpoint {url}"))?
        .connect_timeout(global.timeout.max(Duration::from_secs(1)))
        .tcp_nodelay(true);
    let channel = match global.tls()? {
        Some(tls) if secure => {
            let connector = tls
                .connector(&[b"h2"])
                .context("cannot set up TLS for the endpoint")?;
            let origin = Endpoint::from_shared(url.to_string())
                .with_context(|| format!("invalid endpoint {url}"))?;
            endpoint
                .origin(origin.uri().clone())
                .connect_with_connector(connector)
                .await
        }
        _ => endpoint.connect().await,
    };
    channel.with_context(|| format!("cannot connect to {url}"))
}

fn with_token<T>(message: T, token: Option<&str>) -> anyhow::Result<tonic::Request<T>> {
    let mut req = tonic::Request::new(message);
    if let Some(token) = token {
        req.metadata_mut().insert(
            "token",
            token.parse().context("the server sent an unusable token")?,
        );
    }
    Ok(req)
}

async fn save(global: &GlobalArgs, file: &Path) -> anyhow::Result<()> {
    let urls = global.endpoint_urls()?;
    let [url] = urls.as_slice() else {
        bail!(
            "snapshot save needs exactly one endpoint, got {}",
            urls.len()
        );
    };
    let channel = connect(global, url).await?;
    let token = match global.credentials()? {
        Some((name, password)) => {
            let resp = pb::auth_client::AuthClient::new(channel.clone())
                .authenticate(pb::AuthenticateRequest { name, password })
                .await
                .map_err(|s| anyhow::anyhow!("cannot log in: {}", s.message()))?;
            Some(resp.into_inner().token)
        }
        None => None,
    };
    let mut stream = pb::maintenance_client::MaintenanceClient::new(channel)
        .max_decoding_message_size(usize::MAX)
        .snapshot(with_token(pb::SnapshotRequest {}, token.as_deref())?)
        .await
        .map_err(|s| anyhow::anyhow!("snapshot refused: {}", s.message()))?
        .into_inner();

    let part = part_path(file);
    let mut out = std::fs::File::create(&part)
        .with_context(|| format!("cannot create {}", part.display()))?;
    let result = async {
        let mut check = format::TrailerCheck::default();
        let mut expected: Option<u64> = None;
        let mut revision = 0;
        while let Some(msg) = stream
            .message()
            .await
            .map_err(|s| anyhow::anyhow!("snapshot stream failed: {}", s.message()))?
        {
            if expected.is_none() {
                expected = Some(check.len() + msg.blob.len() as u64 + msg.remaining_bytes);
                revision = msg.header.as_ref().map_or(0, |h| h.revision);
            }
            check.update(&msg.blob);
            out.write_all(&msg.blob)
                .with_context(|| format!("cannot write {}", part.display()))?;
        }
        let total = check.len();
        // etcd's remaining_bytes count the database only, not the
        // trailer it sends last; ours count everything.
        if let Some(expected) = expected
            && total != expected
            && total != expected + format::HASH_BYTES as u64
        {
            bail!("snapshot stream ended after {total} bytes, announced {expected}");
        }
        check
            .finish()
            .context("the received snapshot does not match its SHA-256 trailer")?;
        out.sync_all()
            .with_context(|| format!("cannot sync {}", part.display()))?;
        Ok((total, revision))
    }
    .await;
    let (total, revision) = match result {
        Ok(v) => v,
        Err(e) => {
            let _ = std::fs::remove_file(&part);
            return Err(e);
        }
    };
    drop(out);
    std::fs::rename(&part, file)
        .with_context(|| format!("cannot rename {} to {}", part.display(), file.display()))?;
    sync_parent(file)?;
    match global.output {
        Output::Json => print_json(&serde_json::json!({
            "file": file.display().to_string(),
            "bytes": total,
            "revision": revision,
        })),
        Output::Table => print(&format!(
            "Snapshot saved at {} ({total} bytes, revision {revision})\n",
            file.display()
        )),
    }
}

fn part_path(file: &Path) -> PathBuf {
    let mut name = file.as_os_str().to_owned();
    name.push(".part");
    PathBuf::from(name)
}

fn sync_parent(path: &Path) -> anyhow::Result<()> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    std::fs::File::open(parent)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("cannot sync {}", parent.display()))
}

fn read_snapshot(file: &Path) -> anyhow::Result<(Vec<u8>, muster_server::storage::Recovered)> {
    let bytes = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    let state = format::decode(&bytes)
        .with_context(|| format!("{} is not a valid muster snapshot", file.display()))?;
    Ok((bytes, state))
}

fn restore(file: &Path, dir: &Path) -> anyhow::Result<()> {
    // Everything is checked before anything is written.
    let (_, state) = read_snapshot(file)?;
    match std::fs::read_dir(dir) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                bail!("data directory {} is not empty", dir.display());
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", dir.display())),
    }
    // Written next to DIR, then renamed onto it: DIR never holds half a
    // restore.
    let name = dir
        .file_name()
        .with_context(|| format!("{} has no directory name", dir.display()))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".restore-{}", std::process::id()));
    let tmp = dir.with_file_name(tmp_name);
    let written = muster_server::storage::create_from_state(&tmp, &state)
        .with_context(|| format!("cannot write the data directory {}", tmp.display()))
        .and_then(|()| {
            std::fs::rename(&tmp, dir)
                .with_context(|| format!("cannot rename {} to {}", tmp.display(), dir.display()))
        })
        .and_then(|()| sync_parent(dir));
    if let Err(e) = written {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    print(&format!(
        "Restored {} into {} (revision {}, {} records, {} leases)\n",
        file.display(),
        dir.display(),
        state.revision,
        state.events.len(),
        state.leases.len()
    ))
}

fn status(global: &GlobalArgs, file: &Path) -> anyhow::Result<()> {
    let bytes = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    let st = format::status(&bytes)
        .with_context(|| format!("{} is not a valid muster snapshot", file.display()))?;
    match global.output {
        Output::Json => print_json(&serde_json::json!({
            "hash": st.hash,
            "revision": st.revision,
            "totalKey": st.total_keys,
            "totalSize": st.total_size,
            "events": st.events,
            "leases": st.leases,
            "users": st.users,
            "roles": st.roles,
            "authEnabled": st.auth_enabled,
        })),
        Output::Table => {
            let mut table = Table::new(&["HASH", "REVISION", "TOTAL KEYS", "TOTAL SIZE"]);
            table.row(vec![
                format!("{:x}", st.hash),
                st.revision.to_string(),
                st.total_keys.to_string(),
                human_bytes(st.total_size),
            ]);
            print(&table.render())
        }
    }
}

/// Sizes as etcdctl prints them (`humanize.Bytes`: 1000-based units).
fn human_bytes(n: usize) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    if n < 10 {
        return format!("{n} B");
    }
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1000.0 && unit + 1 < UNITS.len() {
        value /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else if value < 10.0 {
        format!("{value:.1} {}", UNITS[unit])
    } else {
        format!("{value:.0} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn human_bytes_as_etcdctl() {
        assert_eq!(super::human_bytes(5), "5 B");
        assert_eq!(super::human_bytes(999), "999 B");
        assert_eq!(super::human_bytes(20_480), "20 kB");
        assert_eq!(super::human_bytes(1_500_000), "1.5 MB");
    }
}
