//! Registration: keep this process's instances in the registry while it lives.
//!
//! A [`Registrar`] holds one lease for all of the process's registrations and
//! keeps it alive on one keep-alive stream, renewing every TTL/3. It tracks a
//! local deadline (send time of the last answered keep-alive plus the TTL),
//! so it notices a lost lease even when etcd says nothing at all.
//!
//! When the lease is lost (etcd answers TTL 0, the lease is not found, the
//! stream stays broken past the deadline, etcd was restarted or wiped) it
//! grants a new lease and puts every registration again in one transaction,
//! retrying forever with capped, jittered backoff: a live process never stays
//! unregistered. It watches its own keys and restores one deleted or
//! overwritten from outside.
//!
//! Registering an id that another live instance holds fails with
//! [`Error::AlreadyRegistered`]: every write is a create-if-absent (or
//! "still mine") transaction. The state ([`RegistrarState`]) is observable
//! through a `tokio::sync::watch` and every transition is logged.
//!
//! [`Registrar::shutdown`] marks every instance draining, waits the grace
//! period so callers stop sending new work, then revokes the lease so every
//! key goes at once. Dropping the registrar revokes the lease too (best
//! effort); a crashed process's keys vanish when its lease expires.
//!
//! # How it is built
//!
//! The [`Registrar`] is a handle; the work happens in one task, the actor
//! (`actor.rs`), which owns the lease, the registrations and the streams.
//! The handle sends it a `Cmd` and waits for the reply on a oneshot. One
//! owner handling one thing at a time means no lock, and so none held
//! across a network call; keep-alive answers, timers and watch events
//! reach the same loop (`Actor::run`, one `select!`). The transactions
//! it sends are built in `claim.rs`.
//!
//! ## A registration, from `register()` to the keep-alive
//!
//! 1. [`Registrar::register`] checks that the instance encodes, sends
//!    `Cmd::Register` and waits.
//! 2. `Actor::run` receives it and calls `Actor::register`, which encodes
//!    the value with its first-registration time
//!    (`Instance::encode_registration`) and sends one transaction,
//!    `claim::claim_op(key, value, lease, accept = lease)`: *put if the
//!    key is absent, or put if it is under our lease, else read it*.
//! 3. `claim::parse_claim` reads the answer: `Claim::Written`, or
//!    `Claim::HeldBy(lease)`, which is [`Error::AlreadyRegistered`] for the
//!    caller. An answer of "lease not found" is a lease loss (below).
//! 4. A written key is kept in `Actor::regs` and watched from the
//!    transaction's revision + 1 (`Actor::watch_key`), on the client's
//!    shared watch stream. A delete or overwrite from outside arrives in
//!    `Actor::on_own_key_event`, which puts the value back
//!    (`claim_op`, or `claim::restore_over_op` over a lease-less write).
//! 5. The actor's `tick` fires every TTL/3: `Actor::send_keepalive` sends
//!    one request on the keep-alive stream (opening it with
//!    `Etcd::lease_keep_alive` the first time, or after it broke). Each
//!    answer reaches `Actor::on_keepalive`, which moves `Lease::deadline`
//!    to *send time + TTL* and publishes [`RegistrarState::Registered`].
//!
//! ## A lease loss, to the re-registration
//!
//! 1. Three places notice: `Actor::on_keepalive` gets TTL 0 (expired or
//!    revoked); a transaction answers "lease not found"
//!    (`Actor::register`, `Actor::on_own_key_event`); or the lease
//!    deadline arm of `Actor::run` fires (no answer for a whole TTL: etcd
//!    down, partitioned, or silent).
//! 2. Each calls `Actor::lost(reason)`: the lease, the keep-alive stream
//!    and the key watches are dropped, the old lease id is kept in a
//!    `Recovery`, and [`RegistrarState::Recovering`] is published.
//!    Registrations asked for meanwhile are answered
//!    [`Error::Unavailable`] by the actor; the handle retries them with
//!    backoff for up to [`RegistrarConfig::wait`] (as it retries calls
//!    that reach no registry at all), then fails with [`Error::Outage`].
//!    A retried registration whose earlier attempt did reach the registry
//!    finds its key under one of the registrar's own past leases, and
//!    claims it over that lease.
//! 3. The recovery arm of `Actor::run` calls `Actor::try_recover`, which
//!    runs `Actor::reregister_all(old)`: grant a new lease, claim every
//!    key with `claim_op(key, value, new, accept = old)` in transactions
//!    of up to 128 (`claim::MAX_TXN_OPS`), watch each key again, give up
//!    keys another live lease took meanwhile, and start keeping the new
//!    lease alive. The old lease is then revoked in the background and
//!    `Registered` published.
//! 4. If any step fails, the next attempt waits `client::backoff`
//!    (capped, jittered) and the loop goes on, forever.

mod actor;
mod claim;

use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};

use crate::client::Etcd;
use crate::error::{Error, Result};
use crate::instance::{self, Instance, Status};
use crate::layout::{LayoutKind, Source};
use actor::{Actor, Lease};

/// How a [`Registrar`] behaves.
#[derive(Debug, Clone)]
pub struct RegistrarConfig {
    /// Key prefix (default [`instance::DEFAULT_PREFIX`]; may be empty for
    /// layouts that use bare `service/id` keys).
    pub prefix: String,
    /// The layout written (default muster's): with another, a Go client of
    /// that registry finds the instance ([`crate::layout`]). Layouts with
    /// no draining status get a draining instance's key removed instead.
    pub layout: LayoutKind,
    /// Lease time-to-live: how long after a crash the instances vanish.
    /// Whole seconds, at least 1 (etcd rounds up to its minimum).
    pub ttl: Duration,
    /// How long [`Registrar::shutdown`] keeps draining instances visible
    /// before removing them.
    pub grace: Duration,
    /// First retry delay when recovering; doubles up to `backoff_cap`.
    pub backoff_base: Duration,
    /// Longest retry delay when recovering.
    pub backoff_cap: Duration,
    /// How long [`Registrar::start`], [`Registrar::register`] (and
    /// `update`, `set_status`) and [`Registrar::deregister`] wait out a
    /// registry outage, retrying with the backoff above, before failing
    /// with [`Error::Outage`]. Zero fails at once with the outage's error.
    pub wait: Duration,
}

impl Default for RegistrarConfig {
    fn default() -> Self {
        RegistrarConfig {
            prefix: instance::DEFAULT_PREFIX.to_string(),
            layout: LayoutKind::Muster,
            ttl: Duration::from_secs(10),
            grace: Duration::from_secs(2),
            backoff_base: Duration::from_millis(100),
            backoff_cap: Duration::from_secs(5),
            wait: Duration::from_secs(30),
        }
    }
}

impl RegistrarConfig {
    /// Sets how long calls wait out a registry outage
    /// ([`RegistrarConfig::wait`]).
    pub fn with_wait(mut self, wait: Duration) -> Self {
        self.wait = wait;
        self
    }

    /// Sets the lease TTL.
    pub fn with_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// Sets the drain grace period.
    pub fn with_grace(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }

    /// Sets the key prefix.
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// Writes `source`'s layout under its prefix, with the TTL its library
    /// uses by default.
    pub fn with_source(mut self, source: Source) -> Self {
        self.ttl = source.layout.layout().default_ttl();
        self.layout = source.layout;
        self.prefix = source.prefix;
        self
    }

    pub(crate) fn ttl_secs(&self) -> i64 {
        self.ttl.as_secs_f64().ceil().max(1.0) as i64
    }
}

/// What a registrar is doing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegistrarState {
    /// Every registration is in the registry under a live lease.
    Registered {
        /// The lease.
        lease: i64,
    },
    /// The lease was lost or the registry is unreachable; re-registering.
    Recovering {
        /// Why.
        reason: String,
    },
    /// Shutting down: instances are marked draining.
    Draining,
    /// Shut down; the lease is revoked.
    Stopped,
}

/// Keeps this process's instances registered; see the module docs.
#[derive(Debug)]
pub struct Registrar {
    cmd: mpsc::Sender<Cmd>,
    state: watch::Receiver<RegistrarState>,
    prefix: String,
    layout: LayoutKind,
    retry: Retry,
}

/// What the handle asks of the actor; each carries the reply's sender.
pub(crate) enum Cmd {
    Register(Instance, oneshot::Sender<Result<()>>),
    Deregister(String, oneshot::Sender<Result<()>>),
    Shutdown(oneshot::Sender<Result<()>>),
}

impl Registrar {
    /// Grants the lease and starts keeping it alive. While the registry
    /// cannot be reached it retries, for up to [`RegistrarConfig::wait`];
    /// after that, outages are survived.
    pub async fn start(etcd: Etcd, config: RegistrarConfig) -> Result<Registrar> {
        Source::with_prefix(config.layout, config.prefix.clone()).validate()?;
        if config.ttl.is_zero() {
            return Err(Error::invalid("ttl", "must be at least one second"));
        }
        let retry = Retry::of(&config);
        let granted = retry.run(|| etcd.lease_grant(config.ttl_secs())).await?;
        tracing::info!(
            lease = format_args!("{:x}", granted.id),
            ttl = granted.ttl,
            "registrar started"
        );
        let (state_tx, state) = watch::channel(RegistrarState::Registered { lease: granted.id });
        let (cmd, cmd_rx) = mpsc::channel(64);
        let prefix = config.prefix.clone();
        let layout = config.layout;
        let lease = Lease::new(granted.id, granted.ttl);
        tokio::spawn(Actor::new(etcd, config, state_tx, lease).run(cmd_rx));
        Ok(Registrar {
            cmd,
            state,
            prefix,
            layout,
            retry,
        })
    }

    /// Registers (or re-registers) an instance under this process's lease.
    /// Fails with [`Error::AlreadyRegistered`] if another live instance holds
    /// the same service and id. During a registry outage it waits and
    /// retries, for up to [`RegistrarConfig::wait`], then fails with
    /// [`Error::Outage`].
    pub async fn register(&self, instance: Instance) -> Result<()> {
        let mut serving = instance.clone();
        serving.status = Status::Serving;
        self.layout.layout().encode(&serving, None)?;
        self.retry
            .run(|| self.ask(|reply| Cmd::Register(instance.clone(), reply)))
            .await
    }

    /// Replaces a registered instance's fields (metadata, status, weight...)
    /// in place.
    pub async fn update(&self, instance: Instance) -> Result<()> {
        self.register(instance).await
    }

    /// Marks one registered instance draining (or serving again).
    pub async fn set_status(&self, mut instance: Instance, status: Status) -> Result<()> {
        instance.status = status;
        self.register(instance).await
    }

    /// Removes one instance now.
    pub async fn deregister(&self, service: &str, id: &str) -> Result<()> {
        instance::validate_name("service name", service)?;
        instance::validate_name("instance id", id)?;
        let key = crate::layout::key(&self.prefix, service, id);
        self.retry
            .run(|| self.ask(|reply| Cmd::Deregister(key.clone(), reply)))
            .await
    }

    /// The current state.
    pub fn state(&self) -> RegistrarState {
        self.state.borrow().clone()
    }

    /// A receiver that sees every state change.
    pub fn subscribe(&self) -> watch::Receiver<RegistrarState> {
        self.state.clone()
    }

    /// Drains and removes every instance: marks them draining, waits the
    /// grace period, then revokes the lease.
    pub async fn shutdown(self) -> Result<()> {
        self.ask(Cmd::Shutdown).await
    }

    async fn ask(&self, cmd: impl FnOnce(oneshot::Sender<Result<()>>) -> Cmd) -> Result<()> {
        let (reply, rx) = oneshot::channel();
        self.cmd
            .send(cmd(reply))
            .await
            .map_err(|_| Error::Closed("registrar"))?;
        rx.await.map_err(|_| Error::Closed("registrar"))?
    }
}

/// Whether a registrar call failing with `e` is tried again: the registry
/// was unreachable, or the lease was found lost (the actor is then
/// recovering, and takes the retry once it has a new lease).
fn retried(e: &Error) -> bool {
    e.is_transient() || matches!(e, Error::LeaseNotFound)
}

/// Retries a call through a registry outage: transient errors are retried
/// with capped, jittered backoff until the wait is used up.
#[derive(Debug, Clone, Copy)]
struct Retry {
    base: Duration,
    cap: Duration,
    wait: Duration,
}

impl Retry {
    fn of(config: &RegistrarConfig) -> Retry {
        Retry {
            base: config.backoff_base,
            cap: config.backoff_cap,
            wait: config.wait,
        }
    }

    async fn run<T, F, Fut>(&self, mut call: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let started = tokio::time::Instant::now();
        let mut attempt = 0u32;
        loop {
            let error = match call().await {
                Err(e) if retried(&e) && !self.wait.is_zero() => e,
                done => return done,
            };
            let waited = started.elapsed();
            let pause = crate::client::backoff(attempt, self.base, self.cap);
            if waited + pause > self.wait {
                return Err(Error::Outage {
                    waited,
                    last: Box::new(error),
                });
            }
            if attempt == 0 {
                tracing::warn!(%error, wait = ?self.wait, "registry unavailable; retrying");
            }
            attempt = attempt.saturating_add(1);
            tokio::time::sleep(pause).await;
        }
    }
}
