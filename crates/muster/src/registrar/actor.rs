//! The registrar's task: one loop owning the lease, the registrations
//! and their streams (see the walk-throughs in the parent module's docs).

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, SystemTime};

use muster_proto as pb;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_stream::{StreamExt, StreamMap};

use super::claim::{
    Claim, MAX_TXN_OPS, claim_op, delete_if_ours_op, deregister_txn, parse_claim, restore_over_op,
    txn_of,
};
use super::{Cmd, RegistrarConfig, RegistrarState};
use crate::client::{Etcd, WatchEvent, WatchOptions, Watcher, backoff};
use crate::error::{Error, Result};
use crate::instance::{Instance, Status};

pub(super) struct Lease {
    id: i64,
    deadline: Instant,
    /// Send times of keep-alives not answered yet.
    in_flight: VecDeque<Instant>,
}

impl Lease {
    pub(super) fn new(id: i64, ttl_secs: i64) -> Lease {
        let ttl = Duration::from_secs(ttl_secs.max(1) as u64);
        Lease {
            id,
            deadline: Instant::now() + ttl,
            in_flight: VecDeque::new(),
        }
    }
}

pub(super) struct Reg {
    instance: Instance,
    value: Vec<u8>,
    /// Draining in a layout without a status: its key was removed, and is
    /// neither restored nor re-registered until it serves again.
    withdrawn: bool,
    /// When it was first registered: kept across updates and recoveries.
    since: SystemTime,
}

type KeepAlive = (
    mpsc::Sender<pb::LeaseKeepAliveRequest>,
    tonic::Streaming<pb::LeaseKeepAliveResponse>,
);

pub(super) struct Actor {
    etcd: Etcd,
    config: RegistrarConfig,
    state: watch::Sender<RegistrarState>,
    lease: Option<Lease>,
    regs: BTreeMap<String, Reg>,
    keepalive: Option<KeepAlive>,
    watchers: StreamMap<String, Watcher>,
    /// When recovering: the lease we lost (its keys may still exist), the
    /// attempt count and when to try next.
    recovering: Option<Recovery>,
    /// Leases this registrar held before (most recent last, a few): a
    /// registration retried after an outage may find its key under one.
    past_leases: Vec<i64>,
}

/// How many past leases the actor remembers.
const PAST_LEASES: usize = 8;

struct Recovery {
    old_lease: Option<i64>,
    attempt: u32,
    at: Instant,
}

impl Actor {
    /// The actor for a freshly granted lease, with no registrations yet.
    pub(super) fn new(
        etcd: Etcd,
        config: RegistrarConfig,
        state: watch::Sender<RegistrarState>,
        lease: Lease,
    ) -> Actor {
        Actor {
            etcd,
            config,
            state,
            lease: Some(lease),
            regs: BTreeMap::new(),
            keepalive: None,
            watchers: StreamMap::new(),
            recovering: None,
            past_leases: Vec::new(),
        }
    }

    /// Handles commands, keep-alive answers, timers and own-key events,
    /// one at a time, until shutdown or until the handle is dropped.
    pub(super) async fn run(mut self, mut cmd_rx: mpsc::Receiver<Cmd>) {
        let mut tick = tokio::time::interval(self.renew_interval());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let deadline = self.lease.as_ref().map(|l| l.deadline);
            let recover_at = self.recovering.as_ref().map(|r| r.at);
            tokio::select! {
                cmd = cmd_rx.recv() => match cmd {
                    Some(Cmd::Register(instance, reply)) => {
                        let _ = reply.send(self.register(instance).await);
                    }
                    Some(Cmd::Deregister(key, reply)) => {
                        let _ = reply.send(self.deregister(&key).await);
                    }
                    Some(Cmd::Shutdown(reply)) => {
                        let _ = reply.send(self.shutdown().await);
                        return;
                    }
                    None => {
                        // Dropped without shutdown: remove everything now.
                        self.revoke().await.ok();
                        return;
                    }
                },
                _ = tick.tick(), if self.lease.is_some() => self.send_keepalive().await,
                resp = next_keepalive(&mut self.keepalive) => self.on_keepalive(resp),
                _ = sleep_until(deadline) => {
                    self.lost("no keep-alive answer before the lease deadline".into());
                }
                _ = sleep_until(recover_at) => self.try_recover().await,
                Some((key, event)) = self.watchers.next(), if !self.watchers.is_empty() => {
                    self.on_own_key_event(key, event).await;
                }
            }
        }
    }

    fn renew_interval(&self) -> Duration {
        (Duration::from_secs(self.config.ttl_secs() as u64) / 3).max(Duration::from_millis(100))
    }

    fn set_state(&self, state: RegistrarState) {
        self.state.send_if_modified(|current| {
            if *current == state {
                return false;
            }
            match &state {
                RegistrarState::Registered { lease } => {
                    tracing::info!(
                        lease = format_args!("{lease:x}"),
                        registrations = self.regs.len(),
                        "registered"
                    )
                }
                RegistrarState::Recovering { reason } => {
                    tracing::warn!(%reason, "registration lost; recovering")
                }
                RegistrarState::Draining => tracing::info!("draining"),
                RegistrarState::Stopped => tracing::info!("registrar stopped"),
            }
            *current = state;
            true
        });
    }

    async fn send_keepalive(&mut self) {
        let Some(lease) = self.lease.as_mut() else {
            return;
        };
        let id = lease.id;
        if let Some((tx, _)) = &self.keepalive {
            if tx.send(pb::LeaseKeepAliveRequest { id }).await.is_ok() {
                lease.in_flight.push_back(Instant::now());
                return;
            }
            self.keepalive = None;
        }
        let sent = Instant::now();
        match self.etcd.lease_keep_alive(id).await {
            Ok(stream) => {
                if let Some(lease) = self.lease.as_mut() {
                    lease.in_flight.clear();
                    lease.in_flight.push_back(sent);
                }
                self.keepalive = Some(stream);
            }
            Err(e) => tracing::debug!(error = %e, "cannot open the keep-alive stream yet"),
        }
    }

    fn on_keepalive(&mut self, resp: Option<pb::LeaseKeepAliveResponse>) {
        let Some(resp) = resp else {
            tracing::debug!("keep-alive stream broke; reopening on the next tick");
            self.keepalive = None;
            return;
        };
        let Some(lease) = self.lease.as_mut() else {
            return;
        };
        if resp.id != lease.id {
            return;
        }
        let sent = lease.in_flight.pop_front().unwrap_or_else(Instant::now);
        if resp.ttl <= 0 {
            self.lost(format!(
                "lease {:x} expired or was revoked (keep-alive answered TTL 0)",
                resp.id
            ));
            return;
        }
        lease.deadline = sent + Duration::from_secs(resp.ttl as u64);
        let id = lease.id;
        self.set_state(RegistrarState::Registered { lease: id });
    }

    /// The lease is gone (or must be presumed gone): start recovering.
    fn lost(&mut self, reason: String) {
        let old = self.lease.take().map(|l| l.id);
        if let Some(old) = old {
            if self.past_leases.len() == PAST_LEASES {
                self.past_leases.remove(0);
            }
            self.past_leases.push(old);
        }
        self.keepalive = None;
        self.watchers = StreamMap::new();
        self.recovering = Some(Recovery {
            old_lease: old,
            attempt: 0,
            at: Instant::now(),
        });
        self.set_state(RegistrarState::Recovering { reason });
    }

    async fn try_recover(&mut self) {
        let Some(rec) = self.recovering.as_mut() else {
            return;
        };
        let old = rec.old_lease;
        match self.reregister_all(old).await {
            Ok(()) => {
                self.recovering = None;
                if let Some(old) = old {
                    // Its keys moved to the new lease; revoke whatever is left.
                    let etcd = self.etcd.clone();
                    tokio::spawn(async move {
                        let _ = etcd.lease_revoke(old).await;
                    });
                }
                let lease = self.lease.as_ref().map_or(0, |l| l.id);
                self.set_state(RegistrarState::Registered { lease });
            }
            Err(e) => {
                let (base, cap) = (self.config.backoff_base, self.config.backoff_cap);
                let rec = self.recovering.get_or_insert(Recovery {
                    old_lease: old,
                    attempt: 0,
                    at: Instant::now(),
                });
                let wait = backoff(rec.attempt, base, cap);
                rec.attempt = rec.attempt.saturating_add(1);
                rec.at = Instant::now() + wait;
                tracing::warn!(error = %e, retry_in = ?wait, "re-registration failed");
                self.set_state(RegistrarState::Recovering {
                    reason: e.to_string(),
                });
            }
        }
    }

    /// Grants a fresh lease and claims every registration with it, in as few
    /// transactions as etcd allows.
    async fn reregister_all(&mut self, old_lease: Option<i64>) -> Result<()> {
        let granted = self.etcd.lease_grant(self.config.ttl_secs()).await?;
        let new = granted.id;
        let accept = old_lease.unwrap_or(new);
        let keys: Vec<String> = self
            .regs
            .iter()
            .filter(|(_, r)| !r.withdrawn)
            .map(|(k, _)| k.clone())
            .collect();
        let mut lost = Vec::new();
        for chunk in keys.chunks(MAX_TXN_OPS) {
            let ops = chunk
                .iter()
                .map(|k| claim_op(k, &self.regs[k].value, new, accept))
                .collect();
            let resp = match self.etcd.txn(txn_of(ops)).await {
                Ok(r) => r,
                Err(e) => {
                    let _ = self.etcd.lease_revoke(new).await;
                    return Err(e);
                }
            };
            let revision = resp.header.as_ref().map_or(0, |h| h.revision);
            for (key, op) in chunk.iter().zip(resp.responses) {
                match parse_claim(op) {
                    Claim::Written => {}
                    Claim::HeldBy(holder) => lost.push((key.clone(), holder)),
                }
            }
            for key in chunk {
                self.watch_key(key, revision + 1).await;
            }
        }
        for (key, holder) in lost {
            tracing::error!(%key, holder = format_args!("{holder:x}"), "another instance took this id while the lease was lost; giving it up");
            self.regs.remove(&key);
            self.watchers.remove(&key);
        }
        self.lease = Some(Lease::new(new, granted.ttl));
        self.send_keepalive().await;
        Ok(())
    }

    async fn register(&mut self, instance: Instance) -> Result<()> {
        let key = crate::layout::key(&self.config.prefix, &instance.service, &instance.id);
        let since = self
            .regs
            .get(&key)
            .map_or_else(SystemTime::now, |r| r.since);
        let layout = self.config.layout.layout();
        if instance.status == Status::Draining && !layout.has_status() {
            return self.withdraw(key, instance, since).await;
        }
        let value = layout.encode(&instance, Some(since))?;
        let Some(lease) = self.lease.as_ref().map(|l| l.id) else {
            return Err(Error::Unavailable(format!(
                "registrar is recovering: {}",
                match &*self.state.borrow() {
                    RegistrarState::Recovering { reason } => reason.clone(),
                    other => format!("{other:?}"),
                }
            )));
        };
        let mut resp = self
            .etcd
            .txn(txn_of(vec![claim_op(&key, &value, lease, lease)]))
            .await;
        // Held by a lease of ours from before an outage: an earlier attempt
        // of this registration got through. Claim it over that lease.
        if let Ok(r) = &resp
            && let Some(Claim::HeldBy(holder)) = r.responses.first().cloned().map(parse_claim)
            && self.past_leases.contains(&holder)
        {
            resp = self
                .etcd
                .txn(txn_of(vec![claim_op(&key, &value, lease, holder)]))
                .await;
        }
        let resp = match resp {
            Err(Error::LeaseNotFound) => {
                self.lost("lease not found while registering".into());
                return Err(Error::LeaseNotFound);
            }
            other => other?,
        };
        let revision = resp.header.as_ref().map_or(0, |h| h.revision);
        let op = resp.responses.into_iter().next();
        match op.map(parse_claim) {
            Some(Claim::Written) => {
                tracing::info!(%key, addr = %instance.addr, status = %instance.status, "instance registered");
                self.regs.insert(
                    key.clone(),
                    Reg {
                        instance,
                        value,
                        withdrawn: false,
                        since,
                    },
                );
                self.watch_key(&key, revision + 1).await;
                Ok(())
            }
            Some(Claim::HeldBy(holder_lease)) => Err(Error::AlreadyRegistered {
                service: instance.service,
                id: instance.id,
                holder_lease,
            }),
            None => Err(Error::Unavailable("empty transaction response".into())),
        }
    }

    /// Drains `instance` in a layout without a status: removes its key
    /// (if ours) and keeps the registration, so that serving again puts it
    /// back.
    async fn withdraw(&mut self, key: String, instance: Instance, since: SystemTime) -> Result<()> {
        let Some(lease) = self.lease.as_ref().map(|l| l.id) else {
            return Err(Error::Unavailable("registrar is recovering".into()));
        };
        self.watchers.remove(&key);
        self.etcd.txn(deregister_txn(&key, lease)).await?;
        tracing::info!(%key, layout = %self.config.layout, "instance draining: key removed (the layout has no draining status)");
        let value = self
            .regs
            .get(&key)
            .map(|r| r.value.clone())
            .unwrap_or_default();
        self.regs.insert(
            key,
            Reg {
                instance,
                value,
                withdrawn: true,
                since,
            },
        );
        Ok(())
    }

    async fn watch_key(&mut self, key: &str, from: i64) {
        match self
            .etcd
            .watch(WatchOptions::key(key.as_bytes().to_vec()).from_revision(from))
            .await
        {
            Ok(w) => {
                self.watchers.insert(key.to_string(), w);
            }
            Err(e) => tracing::warn!(%key, error = %e, "cannot watch own key"),
        }
    }

    async fn deregister(&mut self, key: &str) -> Result<()> {
        let Some(reg) = self.regs.remove(key) else {
            let (service, id) =
                crate::layout::parse_key(&self.config.prefix, key.as_bytes()).unwrap_or_default();
            return Err(Error::NotRegistered { service, id });
        };
        self.watchers.remove(key);
        let lease = self.lease.as_ref().map_or(0, |l| l.id);
        let result = self.etcd.txn(deregister_txn(key, lease)).await;
        if let Err(e) = result {
            // Keep it: it is still registered and kept alive.
            self.regs.insert(key.to_string(), reg);
            return Err(e);
        }
        tracing::info!(%key, "instance deregistered");
        Ok(())
    }

    async fn on_own_key_event(&mut self, key: String, event: WatchEvent) {
        let Some(lease) = self.lease.as_ref().map(|l| l.id) else {
            return;
        };
        if event.is_terminal() {
            // The watch ended (compaction, reset): check the key, watch again.
            self.watchers.remove(&key);
        }
        if let WatchEvent::PermissionDenied { .. } = &event {
            // Watching again would be refused again: the key is still
            // registered and kept alive, just not guarded against changes
            // from outside.
            let error = event.error().map(|e| e.to_string()).unwrap_or_default();
            tracing::error!(%key, %error, "cannot watch own registration; changes to it from outside will not be undone");
            return;
        }
        let Some(reg) = self.regs.get(&key).filter(|r| !r.withdrawn) else {
            return;
        };
        let restore = match &event {
            WatchEvent::Events { events, .. } => match events.last() {
                Some(e) if e.r#type == pb::EventType::Delete as i32 => {
                    Some(claim_op(&key, &reg.value, lease, lease))
                }
                Some(pb::Event { kv: Some(kv), .. }) if kv.lease == lease => {
                    (kv.value != reg.value).then(|| claim_op(&key, &reg.value, lease, lease))
                }
                Some(pb::Event { kv: Some(kv), .. }) if kv.lease == 0 => {
                    // Overwritten by hand, without a lease: put ours back
                    // unless it changed again since.
                    Some(restore_over_op(&key, &reg.value, lease, kv.mod_revision))
                }
                Some(pb::Event { kv: Some(kv), .. }) => {
                    tracing::error!(%key, holder = format_args!("{:x}", kv.lease), "own registration was taken over under another live lease; leaving it");
                    None
                }
                _ => None,
            },
            e if e.is_terminal() => Some(claim_op(&key, &reg.value, lease, lease)),
            _ => None,
        };
        let Some(op) = restore else {
            return;
        };
        tracing::warn!(%key, "own registration was changed or deleted from outside; restoring it");
        let resp = self.etcd.txn(txn_of(vec![op])).await;
        match resp {
            Ok(resp) => {
                let revision = resp.header.as_ref().map_or(0, |h| h.revision);
                if !self.watchers.contains_key(&key) {
                    self.watch_key(&key, revision + 1).await;
                }
            }
            Err(Error::LeaseNotFound) => self.lost("lease not found while restoring a key".into()),
            Err(e) => {
                tracing::warn!(%key, error = %e, "restore failed; will retry on the next change")
            }
        }
    }

    async fn shutdown(&mut self) -> Result<()> {
        self.set_state(RegistrarState::Draining);
        self.watchers = StreamMap::new();
        if let Some(lease) = self.lease.as_ref().map(|l| l.id) {
            let has_status = self.config.layout.layout().has_status();
            let ops: Vec<_> = self
                .regs
                .iter()
                .filter(|(_, reg)| !reg.withdrawn)
                .map(|(key, reg)| {
                    if !has_status {
                        // No status to mark: remove the key, so that Go
                        // callers stop picking it now.
                        return delete_if_ours_op(key, lease);
                    }
                    let mut draining = reg.instance.clone();
                    draining.status = Status::Draining;
                    let value = self
                        .config
                        .layout
                        .layout()
                        .encode(&draining, Some(reg.since))
                        .unwrap_or_else(|_| reg.value.clone());
                    claim_op(key, &value, lease, lease)
                })
                .collect();
            for chunk in ops.chunks(MAX_TXN_OPS) {
                if let Err(e) = self.etcd.txn(txn_of(chunk.to_vec())).await {
                    tracing::warn!(error = %e, "could not mark instances draining");
                }
            }
            if !self.regs.is_empty() {
                // Keep the lease alive through the grace period.
                let until = Instant::now() + self.config.grace;
                while Instant::now() < until {
                    let step = self.renew_interval().min(until - Instant::now());
                    tokio::time::sleep(step).await;
                    self.send_keepalive().await;
                }
            }
        }
        let result = self.revoke().await;
        self.set_state(RegistrarState::Stopped);
        result
    }

    async fn revoke(&mut self) -> Result<()> {
        self.keepalive = None;
        self.regs.clear();
        match self.lease.take() {
            Some(lease) => match self.etcd.lease_revoke(lease.id).await {
                Ok(_) | Err(Error::LeaseNotFound) => Ok(()),
                Err(e) => Err(e),
            },
            None => Ok(()),
        }
    }
}

async fn next_keepalive(ka: &mut Option<KeepAlive>) -> Option<pb::LeaseKeepAliveResponse> {
    match ka {
        Some((_, stream)) => stream.message().await.ok().flatten(),
        None => std::future::pending().await,
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
