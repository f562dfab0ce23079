//! A user's merged key permissions: the union of its roles' intervals, one
//! set for reading and one for writing, as etcd's `rangePermCache`.
//!
//! A permission is a key (`range_end` empty), a range `[key, range_end)`,
//! or every key from `key` on (`range_end` `[0]`, what etcdctl's
//! `--from-key`, and `--prefix` of an empty prefix, write). A request
//! passes when the union of the user's intervals covers all of it: two
//! roles granting `[a, m)` and `[m, z)` together allow `[a, z)`.

use muster_proto::authpb::{self, permission::Type as PermType};

/// An interval's exclusive end.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum End {
    Key(Vec<u8>),
    Unbounded,
}

/// Disjoint, non-adjacent `[start, end)` intervals in start order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Intervals(Vec<(Vec<u8>, End)>);

impl Intervals {
    fn from_unsorted(mut ivs: Vec<(Vec<u8>, End)>) -> Intervals {
        ivs.retain(|(start, end)| match end {
            End::Key(e) => start < e,
            End::Unbounded => true,
        });
        ivs.sort();
        let mut merged: Vec<(Vec<u8>, End)> = Vec::with_capacity(ivs.len());
        for (start, end) in ivs {
            if let Some((_, last_end)) = merged.last_mut() {
                let touches = match &*last_end {
                    End::Unbounded => true,
                    End::Key(e) => start <= *e,
                };
                if touches {
                    if end > *last_end {
                        *last_end = end;
                    }
                    continue;
                }
            }
            merged.push((start, end));
        }
        Intervals(merged)
    }

    /// The end of the last merged interval starting at or before `key`
    /// (which holds `key` only if it ends past it).
    fn end_at(&self, key: &[u8]) -> Option<&End> {
        let i = self.0.partition_point(|(s, _)| s.as_slice() <= key);
        let (_, end) = &self.0[i.checked_sub(1)?];
        Some(end)
    }
}

/// The interval of a key or range as etcd reads requests and permissions:
/// an empty `range_end` is the key alone, `[0]` every key from `key` on.
fn interval(key: &[u8], range_end: &[u8]) -> (Vec<u8>, End) {
    match range_end {
        [] => {
            let mut end = key.to_vec();
            end.push(0);
            (key.to_vec(), End::Key(end))
        }
        [0] => (key.to_vec(), End::Unbounded),
        end => (key.to_vec(), End::Key(end.to_vec())),
    }
}

/// What one user may read and write.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UserPermissions {
    read: Intervals,
    write: Intervals,
}

/// Read or write, the two checks a request needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Range, watch, prev_kv, txn compares.
    Read,
    /// Put, delete, lease revoke.
    Write,
}

impl UserPermissions {
    /// The union of `roles`' permissions.
    pub fn merge<'a>(roles: impl IntoIterator<Item = &'a authpb::Role>) -> UserPermissions {
        let mut read = Vec::new();
        let mut write = Vec::new();
        for perm in roles.into_iter().flat_map(|r| &r.key_permission) {
            let iv = interval(&perm.key, &perm.range_end);
            match PermType::try_from(perm.perm_type) {
                Ok(PermType::Read) => read.push(iv),
                Ok(PermType::Write) => write.push(iv),
                Ok(PermType::Readwrite) => {
                    read.push(iv.clone());
                    write.push(iv);
                }
                // An unknown type grants nothing.
                Err(_) => {}
            }
        }
        UserPermissions {
            read: Intervals::from_unsorted(read),
            write: Intervals::from_unsorted(write),
        }
    }

    /// Whether the user may `access` the key or range. An empty or
    /// inverted range (`range_end <= key`) is judged by its first key.
    /// Allocates nothing: it runs under the write lock of every checked
    /// write.
    pub fn allows(&self, access: Access, key: &[u8], range_end: &[u8]) -> bool {
        let set = match access {
            Access::Read => &self.read,
            Access::Write => &self.write,
        };
        let Some(end) = set.end_at(key) else {
            return false;
        };
        match (range_end, end) {
            (_, End::Unbounded) => true,
            // From `key` on: only an unbounded interval covers it.
            ([0], End::Key(_)) => false,
            // `key` alone is `[key, key\0)`: covered when the interval
            // ends past `key` (`key\0` is the next key after it).
            ([], End::Key(e)) => e.as_slice() > key,
            (r, End::Key(e)) if r <= key => e.as_slice() > key,
            (r, End::Key(e)) => e.as_slice() >= r,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn role(perms: &[(PermType, &[u8], &[u8])]) -> authpb::Role {
        authpb::Role {
            name: b"r".to_vec(),
            key_permission: perms
                .iter()
                .map(|(t, k, e)| authpb::Permission {
                    perm_type: *t as i32,
                    key: k.to_vec(),
                    range_end: e.to_vec(),
                })
                .collect(),
        }
    }

    #[test]
    fn a_key_permission_covers_that_key_only() {
        let p = UserPermissions::merge([&role(&[(PermType::Read, b"foo", b"")])]);
        assert!(p.allows(Access::Read, b"foo", b""));
        assert!(!p.allows(Access::Read, b"foo1", b""));
        assert!(!p.allows(Access::Read, b"fo", b""));
        assert!(!p.allows(Access::Write, b"foo", b""));
        // A range holding just `foo` is `[foo, foo\0)`.
        assert!(p.allows(Access::Read, b"foo", b"foo\0"));
        assert!(!p.allows(Access::Read, b"foo", b"fop"));
    }

    #[test]
    fn a_prefix_permission_covers_ranges_inside_it_only() {
        let p = UserPermissions::merge([&role(&[(PermType::Readwrite, b"/a/", b"/a0")])]);
        assert!(p.allows(Access::Write, b"/a/x", b""));
        assert!(p.allows(Access::Read, b"/a/", b"/a0"));
        assert!(p.allows(Access::Read, b"/a/x", b"/a/y"));
        assert!(!p.allows(Access::Read, b"/a", b""));
        assert!(!p.allows(Access::Read, b"/a/", b"\0"));
        assert!(!p.allows(Access::Read, b"/", b"/a0"));
    }

    #[test]
    fn the_union_of_roles_covers_what_no_single_role_does() {
        let a = role(&[(PermType::Read, b"a", b"m")]);
        let b = role(&[(PermType::Read, b"m", b"z")]);
        let p = UserPermissions::merge([&a, &b]);
        assert!(p.allows(Access::Read, b"b", b"y"));
        assert!(!p.allows(Access::Read, b"b", b"zz"));
        let gap = role(&[(PermType::Read, b"n", b"z")]);
        let p = UserPermissions::merge([&a, &gap]);
        assert!(!p.allows(Access::Read, b"b", b"y"));
    }

    #[test]
    fn from_key_and_every_key() {
        let p = UserPermissions::merge([&role(&[(PermType::Write, b"k", b"\0")])]);
        assert!(p.allows(Access::Write, b"k", b"\0"));
        assert!(p.allows(Access::Write, b"zzz", b""));
        assert!(!p.allows(Access::Write, b"a", b"\0"));
        let all = UserPermissions::merge([&role(&[(PermType::Read, b"", b"\0")])]);
        assert!(all.allows(Access::Read, b"\0", b"\0"));
        assert!(all.allows(Access::Read, b"anything", b""));
    }

    #[test]
    fn nothing_granted_allows_nothing() {
        let p = UserPermissions::default();
        assert!(!p.allows(Access::Read, b"a", b""));
    }
}
