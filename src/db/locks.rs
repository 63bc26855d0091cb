//! Advisory lock keys. One place, so two features never share a key by accident.
//!
//! Session locks (the singletons) are held through `db::singleton`, on a connection of
//! their own that never goes back to the pool.

/// An advisory lock's key, in either of PostgreSQL's two forms.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockKey {
    /// `pg_*_advisory_lock(bigint)`.
    One(i64),
    /// `pg_*_advisory_lock(int, int)`: a class and an item within it.
    Two(i32, i32),
}

impl LockKey {
    /// How `pg_locks` shows this key: `(classid, objid, objsubid)`.
    pub fn pg_locks_ids(self) -> (i64, i64, i16) {
        match self {
            LockKey::One(k) => (
                ((k as u64) >> 32) as i64,
                ((k as u64) & 0xffff_ffff) as i64,
                1,
            ),
            LockKey::Two(class, item) => (i64::from(class as u32), i64::from(item as u32), 2),
        }
    }
}

/// Serialises proposal creation so gates (caps, dedupe, max_pending) see a consistent
/// count. Transaction-scoped (`pg_advisory_xact_lock` in `proposals::propose_in`).
pub const PROPOSALS: i64 = 0x6f70_0001;

/// One heartbeat tick at a time across all hosts. Session-scoped, held for one tick; the
/// tick checks it still holds it before each phase.
pub const HEARTBEAT: LockKey = LockKey::One(0x6f70_0002);

/// The class of the Telegram poller keys: one `getUpdates` poller per bot token.
const TELEGRAM_POLLER: i32 = 0x6f70_0003;

/// One outbox sender per database. Session-scoped, held while sending.
pub const OUTBOX: LockKey = LockKey::One(0x6f70_0004);

/// One `getUpdates` poller per bot token across all hosts. Session-scoped, held while
/// polling. The item is a hash of the token, which does not reveal it (FNV-1a).
pub fn telegram_poller(token: &str) -> LockKey {
    let mut hash: u32 = 0x811c_9dc5;
    for b in token.bytes() {
        hash ^= u32::from(b);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    LockKey::Two(TELEGRAM_POLLER, hash as i32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_shown_as_pg_locks_shows_them() {
        assert_eq!(HEARTBEAT.pg_locks_ids(), (0, 0x6f70_0002, 1));
        assert_eq!(
            LockKey::One(-1).pg_locks_ids(),
            (0xffff_ffff, 0xffff_ffff, 1)
        );
        assert_eq!(LockKey::Two(7, -2).pg_locks_ids(), (7, 0xffff_fffe, 2));
        // The same token always maps to the same key, different tokens (almost always) not.
        assert_eq!(telegram_poller("123:abc"), telegram_poller("123:abc"));
        assert_ne!(telegram_poller("123:abc"), telegram_poller("123:abd"));
    }
}
