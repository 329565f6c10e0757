//! A typed view of the strict map for plain-data keys and values.

use std::marker::PhantomData;

use bytemuck::Pod;

use super::{MapError, Result, StrictMap};
use crate::persist::Domain;

/// The strict map with `K` keys and `V` values (plain data, compared and stored as bytes).
///
/// A stored key or value of another length than its type (written through the byte map, or with
/// other types) is reported as [`MapError::WrongLength`], never reinterpreted.
#[derive(Debug)]
pub struct TypedMap<K, V, D: Domain> {
    map: StrictMap<D>,
    _types: PhantomData<fn(K) -> V>,
}

/// `bytes` as a `T`, if they are exactly its size.
fn decode<T: Pod>(what: &'static str, bytes: &[u8]) -> Result<T> {
    let expected = std::mem::size_of::<T>();
    if bytes.len() != expected {
        return Err(MapError::WrongLength { what, expected, found: bytes.len() });
    }
    Ok(bytemuck::pod_read_unaligned(bytes))
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
        self.map.get_with(bytemuck::bytes_of(key), |v| decode("value", v))?.transpose()
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

    /// Every entry; the first one of another length ends the walk with its error.
    pub fn entries(&self) -> Result<Vec<(K, V)>> {
        let mut all = Vec::new();
        let mut wrong = None;
        self.map.for_each(|k, v| match decode("key", k).and_then(|k| Ok((k, decode("value", v)?))) {
            Ok(entry) => {
                all.push(entry);
                true
            }
            Err(e) => {
                wrong = Some(e);
                false
            }
        })?;
        wrong.map_or(Ok(all), Err)
    }
}
