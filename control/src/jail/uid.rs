//! The jails' ids: a range of unprivileged uids (and gids, the same
//! numbers), leased one per VM process for its life. The leases live in
//! [`kiln_builder::uids`], which the builder's sandboxed e2fsck leases
//! from too, so that a VM process and an e2fsck never share an id; what
//! the jail uses is re-exported here.
pub use kiln_builder::uids::{LEASES_DIR, LeaseError, UidLease, UidRange};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jail::JailError;

    #[test]
    fn a_full_range_is_the_jails_error() {
        let dir = tempfile::tempdir().unwrap();
        let range = UidRange {
            first: 5000,
            count: 2,
        };
        let _held = range.lease(dir.path(), "i-one").unwrap();
        let err = JailError::from(range.lease(dir.path(), "i-two").unwrap_err());
        assert!(
            matches!(err, JailError::Lease(LeaseError::NoFreeUid { .. })),
            "{err}"
        );
        assert!(
            err.to_string()
                .starts_with("every jail uid of 5000-5001 is held")
        );
    }
}
