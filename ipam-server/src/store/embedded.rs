//! The embedded store: one redb file (ACID, copy-on-write, fsync on commit).

use std::path::{Path, PathBuf};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use super::{CommitError, LeaseStore, Loaded, StoreError};
use crate::allocator::{Change, Lease, LoadProblem, RangeInput};

/// (network, address) -> lease as JSON.
const LEASES: TableDefinition<'_, (&str, &str), &[u8]> = TableDefinition::new("leases");
/// (network, range input as JSON) -> range input as JSON.
const POOLS: TableDefinition<'_, (&str, &str), &[u8]> = TableDefinition::new("pools");

/// "schema" -> version of the record format in this file.
const META: TableDefinition<'_, &str, u64> = TableDefinition::new("meta");
/// The record format this code reads and writes. Bump it, with a migration, when `Lease` or
/// `RangeInput` change incompatibly.
pub const SCHEMA: u64 = 1;

/// File name of the database inside the data directory.
pub const FILE_NAME: &str = "leases.redb";

/// Leases in a redb file.
#[derive(Debug)]
pub struct EmbeddedStore {
    db: Database,
    path: PathBuf,
}

impl EmbeddedStore {
    /// Opens (or creates) `dir/leases.redb`, creating `dir` if needed.
    pub fn open(dir: &Path) -> Result<EmbeddedStore, StoreError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| StoreError::new("create data directory", format!("{}: {e}", dir.display())))?;
        let path = dir.join(FILE_NAME);
        let db = Database::create(&path)
            .map_err(|e| StoreError::new("open database", format!("{}: {e}", path.display())))?;
        let err = |e: &dyn std::fmt::Display| StoreError::new("open tables", e);
        let txn = db.begin_write().map_err(|e| err(&e))?;
        txn.open_table(LEASES).map_err(|e| err(&e))?;
        txn.open_table(POOLS).map_err(|e| err(&e))?;
        {
            let mut meta = txn.open_table(META).map_err(|e| err(&e))?;
            let found = meta.get("schema").map_err(|e| err(&e))?.map(|v| v.value());
            match found {
                None => {
                    meta.insert("schema", SCHEMA).map_err(|e| err(&e))?;
                }
                Some(SCHEMA) => {}
                Some(other) => {
                    return Err(StoreError::new(
                        "open database",
                        format!("{} holds schema {other}; this server reads schema {SCHEMA}", path.display()),
                    ));
                }
            }
        }
        txn.commit().map_err(|e| err(&e))?;
        Ok(EmbeddedStore { db, path })
    }
}

impl LeaseStore for EmbeddedStore {
    fn describe(&self) -> String {
        format!("embedded:{}", self.path.display())
    }

    fn load(&self) -> Result<Loaded, StoreError> {
        let err = |e: &dyn std::fmt::Display| StoreError::new("load", e);
        let txn = self.db.begin_read().map_err(|e| err(&e))?;
        let mut out = Loaded::default();
        let pools = txn.open_table(POOLS).map_err(|e| err(&e))?;
        for row in pools.iter().map_err(|e| err(&e))? {
            let (k, v) = row.map_err(|e| err(&e))?;
            let (network, _) = k.value();
            match serde_json::from_slice::<RangeInput>(v.value()) {
                Ok(r) => out.pools.push((network.to_string(), r)),
                Err(e) => out.problems.push(LoadProblem {
                    what: format!("pool record in network \"{network}\""),
                    error: e.to_string(),
                }),
            }
        }
        let leases = txn.open_table(LEASES).map_err(|e| err(&e))?;
        for row in leases.iter().map_err(|e| err(&e))? {
            let (k, v) = row.map_err(|e| err(&e))?;
            let (network, address) = k.value();
            match serde_json::from_slice::<Lease>(v.value()) {
                Ok(l) if &*l.network == network && l.address.to_string() == address => out.leases.push(l),
                Ok(l) => out.problems.push(LoadProblem {
                    what: format!("lease record {address} in network \"{network}\""),
                    error: format!("holds {} in network \"{}\"", l.address, l.network),
                }),
                Err(e) => out.problems.push(LoadProblem {
                    what: format!("lease record {address} in network \"{network}\""),
                    error: e.to_string(),
                }),
            }
        }
        Ok(out)
    }

    fn commit(&mut self, changes: &[Change]) -> Result<(), CommitError> {
        let err = |e: &dyn std::fmt::Display| StoreError::new("commit", e);
        let txn = self.db.begin_write().map_err(|e| err(&e))?;
        {
            let mut leases = txn.open_table(LEASES).map_err(|e| err(&e))?;
            let mut pools = txn.open_table(POOLS).map_err(|e| err(&e))?;
            for c in changes {
                match c {
                    Change::PutLease(l) => {
                        let v = serde_json::to_vec(l).map_err(|e| err(&e))?;
                        let addr = l.address.to_string();
                        leases.insert((&*l.network, addr.as_str()), v.as_slice()).map_err(|e| err(&e))?;
                    }
                    Change::DeleteLease { network, address } => {
                        let addr = address.to_string();
                        leases.remove((&**network, addr.as_str())).map_err(|e| err(&e))?;
                    }
                    Change::PutPool { network, range } => {
                        let v = serde_json::to_vec(range).map_err(|e| err(&e))?;
                        let k = String::from_utf8_lossy(&v).into_owned();
                        pools.insert((&**network, k.as_str()), v.as_slice()).map_err(|e| err(&e))?;
                    }
                }
            }
        }
        Ok(txn.commit().map_err(|e| err(&e))?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    use crate::allocator::{Attachment, PodRef};

    fn lease(addr: &str) -> Lease {
        Lease {
            address: addr.parse().expect("address"),
            network: "rail0".into(),
            range: "10.0.0.0/24".into(),
            prefix_len: 24,
            gateway: None,
            holder: Arc::new(Attachment {
                container_id: "c1".into(),
                ifname: "net1".into(),
                pod: PodRef { namespace: "ns".into(), name: "p".into(), uid: "u".into() },
                node: "n1".into(),
                ..Default::default()
            }),
            created_unix_ms: 42,
            note: "".into(),
        }
    }

    #[test]
    fn commits_survive_reopen_and_deletes_apply() {
        let dir = tempfile::tempdir().expect("tempdir");
        let range = RangeInput { range: "10.0.0.0/24".into(), ..Default::default() };
        {
            let mut s = EmbeddedStore::open(dir.path()).expect("open");
            s.commit(&[
                Change::PutPool { network: "rail0".into(), range: range.clone() },
                Change::PutLease(lease("10.0.0.1").into()),
                Change::PutLease(lease("10.0.0.2").into()),
            ])
            .expect("commit");
            s.commit(&[Change::DeleteLease {
                network: "rail0".into(),
                address: "10.0.0.1".parse().expect("ip"),
            }])
            .expect("commit");
        }
        let s = EmbeddedStore::open(dir.path()).expect("reopen");
        let loaded = s.load().expect("load");
        assert_eq!(loaded.pools, vec![("rail0".to_string(), range)]);
        assert_eq!(loaded.leases, vec![lease("10.0.0.2")]);
        assert!(loaded.problems.is_empty());
    }

    #[test]
    fn a_file_of_another_schema_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let s = EmbeddedStore::open(dir.path()).expect("open");
            let txn = s.db.begin_write().expect("txn");
            txn.open_table(META).expect("meta").insert("schema", 99).expect("insert");
            txn.commit().expect("commit");
        }
        let err = EmbeddedStore::open(dir.path()).expect_err("newer schema");
        assert_eq!(
            err.to_string(),
            format!(
                "open database: {} holds schema 99; this server reads schema 1",
                dir.path().join(FILE_NAME).display()
            )
        );
    }

    #[test]
    fn undecodable_records_are_reported_not_fatal() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = EmbeddedStore::open(dir.path()).expect("open");
        let txn = s.db.begin_write().expect("txn");
        {
            let mut t = txn.open_table(LEASES).expect("table");
            t.insert(("", "10.0.0.9"), b"{not json".as_slice()).expect("insert");
            let moved = serde_json::to_vec(&lease("10.0.0.7")).expect("json");
            t.insert(("", "10.0.0.8"), moved.as_slice()).expect("insert");
        }
        txn.commit().expect("commit");
        let loaded = s.load().expect("load");
        assert!(loaded.leases.is_empty());
        let what: Vec<_> = loaded.problems.iter().map(|p| format!("{}: {}", p.what, p.error)).collect();
        assert_eq!(what.len(), 2);
        assert_eq!(what[0], "lease record 10.0.0.8 in network \"\": holds 10.0.0.7 in network \"rail0\"");
        assert!(
            what[1].starts_with("lease record 10.0.0.9 in network \"\": key must be a string"),
            "{}",
            what[1]
        );
    }
}
