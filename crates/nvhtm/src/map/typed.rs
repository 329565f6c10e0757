//! A typed view of the strict map for plain-data keys and values.

use std::marker::PhantomData;

use bytemuck::Pod;

use super::{Result, StrictMap};
use crate::persist::Domain;

/// The strict map with `K` keys and `V` values (plain data, compared and stored as bytes).
#[derive(Debug)]
pub struct TypedMap<K, V, D: Domain> {
    map: StrictMap<D>,
    _types: PhantomData<fn(K) -> V>,
}

impl<K: Pod, V: Pod, D: Domain> TypedMap<K, V, D> {
    /// Wraps a byte map.
    pub fn new(map: StrictMap<D>) -> TypedMap<K, V, D> {
        TypedMap { map, _types: PhantomData }
    }

    /// The byte map underneath.
    pub fn bytes(&self) -> &StrictMap<D> {
        &self.map
    }

    /// The value of `key`.
    pub fn get(&self, key: &K) -> Result<Option<V>> {
        Ok(self.map.get(bytemuck::bytes_of(key))?.map(|v| bytemuck::pod_read_unaligned(&v)))
    }

    /// Inserts if absent; `false` if present.
    pub fn insert(&self, key: &K, value: &V) -> Result<bool> {
        self.map.insert(bytemuck::bytes_of(key), bytemuck::bytes_of(value))
    }

    /// Inserts or replaces; `true` if new.
    pub fn upsert(&self, key: &K, value: &V) -> Result<bool> {
        self.map.upsert(bytemuck::bytes_of(key), bytemuck::bytes_of(value))
    }

    /// Removes; `true` if it was present.
    pub fn remove(&self, key: &K) -> Result<bool> {
        self.map.remove(bytemuck::bytes_of(key))
    }

    /// Every entry.
    pub fn entries(&self) -> Result<Vec<(K, V)>> {
        Ok(self
            .map
            .entries()?
            .into_iter()
            .map(|(k, v)| (bytemuck::pod_read_unaligned(&k), bytemuck::pod_read_unaligned(&v)))
            .collect())
    }
}
