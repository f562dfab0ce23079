//! etcd's "simple" tokens: random, opaque, held in memory only (a restart
//! invalidates every token, as etcd's do), each living `ttl` after its
//! last use.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

const LETTERS: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";
/// Random letters per token, as etcd's `defaultSimpleTokenLength`.
const TOKEN_LETTERS: usize = 16;
/// How often expired tokens are swept out (etcd's resolution: 1 s).
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// A random token for the server's own in-process clients (see
/// `Core::internal_token`): 32 random letters and `.internal`, so it never
/// collides with a simple token. Without randomness from the OS (which
/// also fails every login) it is a value no request can carry (a newline
/// is not allowed in gRPC metadata): never a guessable one.
pub fn internal_token() -> String {
    match random_letters::<32>() {
        Ok(letters) => format!("{letters}.internal"),
        Err(e) => {
            tracing::error!(error = %e, "no randomness for the internal token: in-process clients cannot act as the server");
            "\n.internal-disabled".to_string()
        }
    }
}

/// `N` random letters from the operating system.
fn random_letters<const N: usize>() -> Result<String, getrandom::Error> {
    let mut random = [0u8; N];
    getrandom::fill(&mut random)?;
    Ok(random
        .iter()
        .map(|b| LETTERS[usize::from(*b) % LETTERS.len()] as char)
        .collect())
}

struct Entry {
    user: Arc<str>,
    expires: Instant,
}

struct State {
    tokens: HashMap<String, Entry>,
    next_index: u64,
    last_sweep: Instant,
}

/// The live tokens.
pub struct Tokens {
    ttl: Duration,
    state: Mutex<State>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokens")
            .field("ttl", &self.ttl)
            .field("live", &self.len())
            .finish()
    }
}

impl Tokens {
    /// No tokens yet; each will live `ttl` after its last use.
    pub fn new(ttl: Duration) -> Tokens {
        Tokens {
            ttl,
            state: Mutex::new(State {
                tokens: HashMap::new(),
                next_index: 1,
                last_sweep: Instant::now(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A new token for `user`: 16 random letters, a dot and a sequence
    /// number, as etcd's (`abcdefghijklmnop.42`). Fails only when the
    /// operating system has no randomness to give.
    pub fn assign(&self, user: &str) -> Result<String, getrandom::Error> {
        self.assign_at(user, Instant::now())
    }

    fn assign_at(&self, user: &str, now: Instant) -> Result<String, getrandom::Error> {
        let letters = random_letters::<TOKEN_LETTERS>()?;
        let mut st = self.lock();
        if now.duration_since(st.last_sweep) >= SWEEP_INTERVAL {
            st.tokens.retain(|_, e| e.expires > now);
            st.last_sweep = now;
        }
        let token = format!("{letters}.{}", st.next_index);
        st.next_index += 1;
        st.tokens.insert(
            token.clone(),
            Entry {
                user: Arc::from(user),
                expires: now + self.ttl,
            },
        );
        Ok(token)
    }

    /// The user `token` belongs to, starting its time to live again; `None`
    /// for an unknown or expired token.
    pub fn resolve(&self, token: &str) -> Option<Arc<str>> {
        self.resolve_at(token, Instant::now())
    }

    fn resolve_at(&self, token: &str, now: Instant) -> Option<Arc<str>> {
        let mut st = self.lock();
        let entry = st.tokens.get_mut(token)?;
        if entry.expires <= now {
            st.tokens.remove(token);
            return None;
        }
        entry.expires = now + self.ttl;
        Some(entry.user.clone())
    }

    /// Drops every token of `user` (deleted, or its password changed).
    pub fn invalidate_user(&self, user: &str) {
        self.lock().tokens.retain(|_, e| &*e.user != user);
    }

    /// Drops every token (auth disabled).
    pub fn clear(&self) {
        self.lock().tokens.clear();
    }

    /// Tokens alive (or expired and not yet swept).
    pub fn len(&self) -> usize {
        self.lock().tokens.len()
    }

    /// Whether there is no token.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_look_like_etcds_and_resolve_to_their_user() {
        let t = Tokens::new(Duration::from_secs(60));
        let a = t.assign("alice").unwrap();
        let b = t.assign("alice").unwrap();
        assert_ne!(a, b);
        let (letters, index) = a.split_once('.').unwrap();
        assert_eq!(letters.len(), 16);
        assert!(letters.bytes().all(|c| c.is_ascii_alphabetic()));
        assert!(index.parse::<u64>().is_ok());
        assert_eq!(t.resolve(&a).as_deref(), Some("alice"));
        assert_eq!(t.resolve("nope.1"), None);
    }

    #[test]
    fn an_unused_token_expires_and_a_used_one_lives_on() {
        let s = Duration::from_secs;
        let t = Tokens::new(s(10));
        let t0 = Instant::now();
        let unused = t.assign_at("alice", t0).unwrap();
        let used = t.assign_at("bob", t0).unwrap();
        // Each use starts the 10 s again: bob's token outlives its TTL
        // three times over.
        for at in [8, 16, 24, 32] {
            assert_eq!(t.resolve_at(&used, t0 + s(at)).as_deref(), Some("bob"));
        }
        assert_eq!(
            t.resolve_at(&unused, t0 + s(10)),
            None,
            "unused for its TTL"
        );
        assert_eq!(t.len(), 1, "an expired token is dropped when seen");
        // Unused from 32 s on: gone at 42 s.
        assert_eq!(t.resolve_at(&used, t0 + s(41)).as_deref(), Some("bob"));
        assert_eq!(t.resolve_at(&used, t0 + s(52)), None);
        assert!(t.is_empty());
    }

    #[test]
    fn invalidating_a_user_drops_only_its_tokens() {
        let t = Tokens::new(Duration::from_secs(60));
        let a = t.assign("alice").unwrap();
        let b = t.assign("bob").unwrap();
        t.invalidate_user("alice");
        assert_eq!(t.resolve(&a), None);
        assert_eq!(t.resolve(&b).as_deref(), Some("bob"));
        t.clear();
        assert_eq!(t.resolve(&b), None);
    }
}
