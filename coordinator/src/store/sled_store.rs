//! The embedded backend: one sled database in the coordinator's data directory.

use std::path::Path;

use super::{Keyspace, KvStore, Record, StoreError};

pub struct SledStore {
    db: sled::Db,
}

fn backend(error: sled::Error) -> StoreError {
    StoreError::Backend(error.to_string())
}

impl SledStore {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = sled::Config::new()
            .path(path)
            .flush_every_ms(Some(200))
            .open()
            .map_err(backend)?;
        Ok(Self { db })
    }

    fn tree(&self, space: Keyspace) -> Result<sled::Tree, StoreError> {
        self.db.open_tree(space.name()).map_err(backend)
    }
}

impl KvStore for SledStore {
    fn get(&self, space: Keyspace, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .tree(space)?
            .get(key)
            .map_err(backend)?
            .map(|v| v.to_vec()))
    }

    fn put(&self, space: Keyspace, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        self.tree(space)?.insert(key, value).map_err(backend)?;
        Ok(())
    }

    fn compare_and_swap(
        &self,
        space: Keyspace,
        key: &[u8],
        expected: Option<&[u8]>,
        new: Option<&[u8]>,
    ) -> Result<bool, StoreError> {
        Ok(self
            .tree(space)?
            .compare_and_swap(key, expected, new)
            .map_err(backend)?
            .is_ok())
    }

    fn scan(&self, space: Keyspace) -> Result<Vec<Record>, StoreError> {
        self.tree(space)?
            .iter()
            .map(|item| item.map(|(k, v)| (k.to_vec(), v.to_vec())).map_err(backend))
            .collect()
    }

    fn scan_from(
        &self,
        space: Keyspace,
        start: &[u8],
        limit: usize,
    ) -> Result<Vec<Record>, StoreError> {
        self.tree(space)?
            .range(start..)
            .take(limit)
            .map(|item| item.map(|(k, v)| (k.to_vec(), v.to_vec())).map_err(backend))
            .collect()
    }

    fn last(&self, space: Keyspace) -> Result<Option<Record>, StoreError> {
        Ok(self
            .tree(space)?
            .last()
            .map_err(backend)?
            .map(|(k, v)| (k.to_vec(), v.to_vec())))
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.db.flush().map_err(backend)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn survives_reopen_and_cas_is_exclusive() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = SledStore::open(dir.path()).unwrap();
            store.put(Keyspace::Tokens, b"t", b"fresh").unwrap();
            assert!(store
                .compare_and_swap(Keyspace::Tokens, b"t", Some(b"fresh"), Some(b"used"))
                .unwrap());
            assert!(!store
                .compare_and_swap(Keyspace::Tokens, b"t", Some(b"fresh"), Some(b"used"))
                .unwrap());
            store.flush().unwrap();
        }
        let store = SledStore::open(dir.path()).unwrap();
        assert_eq!(
            store.get(Keyspace::Tokens, b"t").unwrap().as_deref(),
            Some(&b"used"[..])
        );
        assert!(store.get(Keyspace::Nodes, b"t").unwrap().is_none());
        assert_eq!(store.scan(Keyspace::Tokens).unwrap().len(), 1);
        for key in [b"a", b"b", b"c"] {
            store.put(Keyspace::Nodes, key, key).unwrap();
        }
        let page = store.scan_from(Keyspace::Nodes, b"b", 5).unwrap();
        assert_eq!(page.len(), 2);
        assert_eq!(page[0].0, b"b");
        assert_eq!(store.scan_from(Keyspace::Nodes, b"a", 1).unwrap().len(), 1);
        assert_eq!(store.last(Keyspace::Nodes).unwrap().unwrap().0, b"c");
        assert!(store.last(Keyspace::Rollouts).unwrap().is_none());
    }
}
